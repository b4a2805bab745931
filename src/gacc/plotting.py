"""Figures of predicted clusters over an anatomical template, drawn with nilearn."""

import logging

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["plot_cluster_comparison"]


def plot_cluster_comparison(predicted_img, reference_img, template_img, path, *, title=None,
                            cut_coords=(0, -18, 12), dpi=110):
    """Save a figure of predicted clusters above reference clusters.

    Each row shows the clusters of one 4D binary image as filled contours
    over ``template_img``, with nilearn's ``plot_prob_atlas``.

    Parameters
    ----------
    predicted_img, reference_img : nibabel image
        4D images (X, Y, Z, K) of cluster masks on the template's grid.
    template_img : nibabel image
        Anatomical background, for example the MNI152 T1 template.
    path : str or Path
        Output PNG file.
    title : str, optional
        Title of the upper row.
    cut_coords : tuple of 3 floats, default=(0, -18, 12)
        MNI coordinates (mm) of the three orthogonal cuts.
    dpi : int, default=110
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from nilearn import plotting

    import warnings

    figure, axes = plt.subplots(2, 1, figsize=(10, 7.2))
    rows = (
        (predicted_img, title or "GACC prediction"),
        (reference_img, "Reference clusters"),
    )
    for axis, (img, row_title) in zip(axes, rows):
        data = np.asarray(img.dataobj)
        if data.ndim == 4 and not data.any(axis=(0, 1, 2)).any():
            axis.set_axis_off()
            axis.text(0.5, 0.5, f"{row_title}: no voxel above threshold", color="white",
                      ha="center", va="center", transform=axis.transAxes)
            continue
        with warnings.catch_warnings():
            # nilearn warns about masked colorbar values and about clusters that
            # are empty at the threshold; the figure shows both cases as they are.
            warnings.simplefilter("ignore", UserWarning)
            plotting.plot_prob_atlas(
                img, bg_img=template_img, view_type="filled_contours", threshold=0.5,
                display_mode="ortho", cut_coords=cut_coords, axes=axis, title=row_title,
                draw_cross=False, annotate=True,
            )
    figure.savefig(path, dpi=dpi, facecolor="black")
    plt.close(figure)
    logger.info("Saved figure %s", path)
    return path

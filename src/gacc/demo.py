"""The demo job: GACC on real atlas data, with part of the labels held out.

The data are the probabilistic Juelich cytoarchitectonic maps and the
clusters the thresholded Harvard-Oxford regions, both on a 3 mm MNI grid
(see :func:`gacc.datasets.load_demo`). The labels are kept on a few axial
slices shared by all clusters, as a user would paint whole slices. The model
predicts every other entry, and the Dice score is computed on those held-out
entries only.
"""

import csv
import json
import logging
import time
from pathlib import Path

import numpy as np

from ._atomic import atomic_path
from .callbacks import ProgressBar
from .estimator import GACC

logger = logging.getLogger(__name__)

__all__ = ["load_demo_task", "run_demo", "write_history"]


def write_history(history, path):
    """Write the per-step loss history as CSV with one column per loss term."""
    names = sorted(history)
    n_steps = max((len(values) for values in history.values()), default=0)
    with atomic_path(path) as tmp_path, open(tmp_path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["step", *names])
        for step in range(n_steps):
            writer.writerow([step + 1, *(f"{history[name][step]:.6g}" for name in names)])
    return path


def run_demo(output_dir="gacc_demo", *, n_given_clusters=28, num_clusters=None, epochs=40,
             num_batches=10, n_known_slices=6, device="auto", random_state=0, data_dir=None,
             progress=True, **model_params):
    """Fit GACC on the real demo case and write predictions, scores and a figure.

    Parameters
    ----------
    output_dir : str or Path, default="gacc_demo"
        Folder for the outputs; created if missing.
    n_given_clusters : int or None, default=28
        P, how many Harvard-Oxford regions are given, the largest first;
        None gives all of them.
    num_clusters : int, optional
        K; default 50, or P when P is larger.
    epochs, num_batches : int
        Training budget: ``epochs * num_batches`` steps.
    n_known_slices : int, default=6
        Axial slices on which each cluster's labels are kept.
    device : str, default="auto"
    random_state : int, default=0
        Seed of the split and of the model.
    data_dir : str or Path, optional
        Cache folder of the demo case (default ``$GACC_DATA`` or ``~/gacc_data``).
    progress : bool, default=True
        Show a progress bar.
    **model_params
        Other :class:`gacc.GACC` parameters.

    Returns
    -------
    summary : dict
        Held-out scores, timings and the paths written.
    """
    from .metrics import evaluate_clusters
    from .nifti import save_img, to_img
    from .plotting import plot_cluster_comparison

    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(
            f"Output folder {str(output_dir)!r} is a file; choose a folder name."
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    demo = load_demo_task(n_given_clusters=n_given_clusters, n_known_slices=n_known_slices,
                          random_state=random_state, data_dir=data_dir)
    split = demo.split
    cluster_xyzp, cluster_names = demo.cluster_xyzp, demo.cluster_names
    n_clusters_given = cluster_xyzp.shape[3]
    if num_clusters is None:
        num_clusters = max(50, n_clusters_given)
    known_share = demo.known_share

    model = GACC(num_clusters=num_clusters, device=device, random_state=random_state,
                 **model_params)
    callbacks = [ProgressBar()] if progress else []
    start = time.perf_counter()
    model.fit(demo.data_xyzt, split.cluster_xyzp, mask=demo.mask, num_batches=num_batches,
              epochs=epochs, callbacks=callbacks)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    proba_xyzk = model.predict(demo.data_xyzt, mask=demo.mask)
    predict_seconds = time.perf_counter() - start

    scores = evaluate_clusters(
        cluster_xyzp, proba_xyzk[..., :n_clusters_given], mask=split.held_out_mask
    )
    paths = {
        "probabilities": save_img(proba_xyzk, demo.data_img, output_dir / "proba_xyzk.nii.gz"),
        "clusters": save_img(
            (proba_xyzk >= 0.5).astype(np.uint8), demo.data_img, output_dir / "clusters_xyzk.nii.gz"
        ),
        "known_clusters": save_img(
            split.cluster_xyzp, demo.data_img, output_dir / "annotations_xyzp.nii.gz"
        ),
        "model": model.save(output_dir / "model.pt"),
        "history": write_history(model.history_, output_dir / "history.csv"),
    }
    reference_img = to_img(cluster_xyzp.astype(np.uint8), demo.data_img)
    predicted_img = to_img((proba_xyzk[..., :n_clusters_given] >= 0.5).astype(np.uint8),
                           demo.data_img)
    paths["figure"] = plot_cluster_comparison(
        predicted_img, reference_img, demo.template_img, output_dir / "clusters.png",
        title=f"GACC, {n_clusters_given} clusters (held-out Dice {scores['mean_dice']:.2f})",
    )

    per_cluster = [
        {"cluster": name, "dice": _finite_or_none(dice), "iou": _finite_or_none(iou),
         "auc": _finite_or_none(auc)}
        for name, dice, iou, auc in zip(cluster_names, scores["dice"], scores["iou"],
                                        scores["auc"])
    ]
    summary = {
        "mean_dice": float(scores["mean_dice"]),
        "median_dice": float(scores["median_dice"]),
        "mean_iou": float(scores["mean_iou"]),
        "mean_auc": float(scores["mean_auc"]),
        "onmi": float(scores["onmi"]),
        "known_share": known_share,
        "n_clusters_given": n_clusters_given,
        "num_clusters": num_clusters,
        "n_steps": model.n_steps_,
        "fit_seconds": fit_seconds,
        "predict_seconds": predict_seconds,
        "device": str(model.device_),
        "per_cluster": per_cluster,
        "paths": {name: str(path) for name, path in paths.items()},
    }
    with atomic_path(output_dir / "scores.json") as tmp_path:
        tmp_path.write_text(json.dumps(summary, indent=2))
    summary["paths"]["scores"] = str(output_dir / "scores.json")
    return summary


def load_demo_task(*, n_given_clusters=28, n_known_slices=6, random_state=0, data_dir=None):
    """Load the demo case with its clusters known on a few axial slices only.

    Returns the :func:`gacc.datasets.load_demo` Bunch with ``cluster_xyzp``
    and ``cluster_names`` narrowed to the ``n_given_clusters`` largest
    regions (in atlas order), plus ``split`` (the
    :func:`gacc.splits.hide_slices` Bunch: partial ``cluster_xyzp`` with NaN
    for unknown entries, ``known_mask``, ``held_out_mask``) and
    ``known_share``, the share of in-mask cluster entries that are known.
    """
    from . import datasets, splits

    demo = datasets.load_demo(data_dir=data_dir)
    demo.cluster_xyzp, demo.cluster_names = _largest_clusters(
        demo.cluster_xyzp, demo.cluster_names, demo.mask, n_given_clusters
    )
    # The same slices for every region, as when a user paints whole slices:
    # the held-out entries then cover whole slices, which the cover scores need.
    demo.split = splits.hide_slices(
        demo.cluster_xyzp, axis=2, n_known_slices=n_known_slices, mask=demo.mask,
        per_cluster=False, random_state=random_state,
    )
    demo.known_share = float(demo.split.known_mask[demo.mask].mean())
    logger.info("Demo split: %.1f%% of the in-mask cluster entries are known",
                100 * demo.known_share)
    return demo


def _largest_clusters(cluster_xyzp, names, mask, count):
    """Keep the ``count`` clusters with most voxels in the mask, in atlas order."""
    if count is None or count >= cluster_xyzp.shape[3]:
        return cluster_xyzp, list(names)
    if count < 1:
        raise ValueError(f"n_given_clusters={count} must be >= 1, or None for all clusters.")
    sizes = (cluster_xyzp[mask] > 0.5).sum(axis=0)
    keep = np.sort(np.argsort(-sizes, kind="stable")[:count])
    return cluster_xyzp[..., keep], [names[index] for index in keep]


def _finite_or_none(value):
    value = float(value)
    return value if np.isfinite(value) else None

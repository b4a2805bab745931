"""Held-out quality benchmark: GACC, its ablations and scikit-learn baselines.

Each task hides part of the reference clusters from training
(:mod:`gacc.splits`), fits every method on the rest and scores the
predictions on the hidden entries only (:mod:`gacc.metrics`):

- ``sparse``: all clusters are known on the same few axial slices
  (``hide_slices``), like a painted annotation.
- ``voxels``: labels are known on 5 % of the voxels, scattered.
- ``region``: labels are known on one side of the brain (``hide_region``).
- ``discovery``: some clusters are removed entirely (``hide_clusters``);
  GACC gets ``K = P_given + n_hidden`` clusters and its free clusters are
  matched one to one (Hungarian matching on Dice) with the hidden ones.

Run from the repository root::

    python benchmarks/quality.py                    # full run, writes docs/
    python benchmarks/quality.py --quick --out /tmp/q   # seconds, small data

The page ``quality.md`` and the figures ``img/quality_*.png`` are written
into ``--out``. The part of an existing page between the markers
``<!-- quality-results:begin -->`` and ``<!-- quality-results:end -->`` is
replaced, so hand-written text around it is kept.
"""

import argparse
import contextlib
import csv
import datetime
import json
import logging
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines import DISCOVERY_BASELINES, SEMI_SUPERVISED_BASELINES  # noqa: E402

from gacc import splits  # noqa: E402
from gacc._atomic import atomic_path  # noqa: E402
from gacc.metrics import evaluate_clusters  # noqa: E402

try:
    from gacc import GACC
except ImportError as error:  # the engine may be missing from a partial checkout
    GACC = None
    GACC_IMPORT_ERROR = error
else:
    GACC_IMPORT_ERROR = None

logger = logging.getLogger("quality")

BEGIN_MARKER = "<!-- quality-results:begin -->"
END_MARKER = "<!-- quality-results:end -->"

TASKS = ("sparse", "voxels", "region", "discovery")
DATASETS = ("demo", "semisynthetic")

# GACC variants: loss weights changed from the estimator's defaults.
GACC_VARIANTS = {
    "gacc": {},
    "gacc_no_adversarial": {"adversarial_weight": 0.0},
    "gacc_no_xc": {"xc_weight": 0.0},
    "gacc_no_cx": {"cx_weight": 0.0},
    "gacc_supervised_only": {"adversarial_weight": 0.0, "xc_weight": 0.0, "cx_weight": 0.0},
    "gacc_global_sets": {"set_sampling": "global"},
    "gacc_xc_0.1": {"xc_weight": 0.1},
    "gacc_balanced": {"class_weight": "balanced"},
}

# Prediction variants of the fitted default GACC model: estimator parameters
# changed for ``predict`` only, so they cost one prediction and no training.
GACC_PREDICTION_VARIANTS = {
    "gacc_single_draw": {"prediction_repeats": 1},
}

METHOD_DESCRIPTIONS = {
    "gacc": "GACC with the default loss weights (prediction averaged over 8 random "
            "set draws)",
    "gacc_single_draw": "the same fitted `gacc` model predicting from one random set draw "
                        "(prediction_repeats=1); its time is the fit plus this prediction",
    "gacc_no_adversarial": "GACC without the adversarial term (adversarial_weight=0)",
    "gacc_no_xc": "GACC without the entity-to-cluster predictor (xc_weight=0)",
    "gacc_no_cx": "GACC without the cluster-to-entity predictor (cx_weight=0)",
    "gacc_supervised_only": "GACC generator trained on the supervised loss only",
    "gacc_balanced": "GACC with class_weight='balanced': known members weighted by the ratio "
                     "of known non-members to members of their cluster (at most 50)",
    "gacc_xc_0.1": "GACC with xc_weight=0.1 instead of the default 0.01",
    "gacc_global_sets": "GACC whose sets, in training and prediction, are drawn from the whole "
                        "foreground (set_sampling='global') instead of local cubes",
    "knn": "k-nearest neighbours (k=15, distance-weighted) on 10 PCA components + coordinates",
    "random_forest": "random forest (50 trees) on features, Gaussian-smoothed features "
                     "(sigma 1 and 2 voxels) and coordinates, as in ilastik",
    "label_spreading": "label spreading on a 10-nearest-neighbour graph, one binary "
                       "problem per cluster",
    "kmeans": "k-means with K clusters on 10 PCA components + coordinates",
    "gaussian_mixture": "diagonal Gaussian mixture with K components, posterior probabilities",
}

# Model sizes and training budgets. The full budget is half of gacc.GACC.fit's
# default (10 batches x 40 epochs) so that the default run stays near 20 minutes
# on a 2-core CPU.
FULL_BUDGET = {
    "num_batches": 10,
    "epochs": 20,
    "model": {},
}
QUICK_BUDGET = {
    "num_batches": 4,
    "epochs": 5,
    "model": {
        "hidden_size": 16,
        "column_hidden_size": 16,
        "num_heads": 2,
        "num_layers": 1,
        "batch_size": 8,
        "prediction_repeats": 2,
    },
}


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def load_case(name, *, quick, data_dir=None, downsample=1, n_clusters=None):
    """Load one benchmark case as a dict with data, reference clusters, mask and names.

    ``n_clusters`` keeps that many reference clusters of the demo case,
    drawn at random with a fixed seed (0) so that every run scores the same
    ones. GACC's training step costs time in proportion to the number of
    clusters, which is why the full run does not use all of the demo's regions.
    """
    from gacc import datasets

    if name == "demo":
        demo = datasets.load_demo(data_dir=data_dir)
        data_xyzt = np.asarray(demo.data_xyzt, dtype=np.float32)
        cluster_xyzp = np.asarray(demo.cluster_xyzp, dtype=np.float32)
        mask = np.asarray(demo.mask, dtype=bool)
        names = [str(n) for n in demo.cluster_names]
        n_regions = cluster_xyzp.shape[3]
        description = (
            f"real demo case (`gacc.datasets.load_demo`): {data_xyzt.shape[3]} Juelich "
            f"probabilistic maps as features, thresholded Harvard-Oxford regions as clusters"
        )
        if n_clusters is not None and n_clusters < n_regions:
            kept_regions = np.sort(
                np.random.default_rng(0).choice(n_regions, n_clusters, replace=False)
            )
            cluster_xyzp = cluster_xyzp[..., kept_regions]
            names = [names[i] for i in kept_regions]
            description += f" ({n_clusters} of the {n_regions} regions, drawn with seed 0)"
        else:
            description += f" (all {n_regions} regions)"
    else:
        if quick:
            options = {"shape": (16, 18, 14), "n_timepoints": 24, "n_clusters": 4}
        else:
            options = {"shape": (32, 38, 30), "n_timepoints": 80, "n_clusters": 8}
        case = datasets.make_semisynthetic_fmri(
            **options, overlap=0.2, snr=1.0, random_state=0, regions="blobs"
        )
        data_xyzt = np.asarray(case.data_xyzt, dtype=np.float32)
        cluster_xyzp = np.asarray(case.cluster_xyzp, dtype=np.float32)
        mask = np.asarray(case.mask, dtype=bool)
        names = [str(n) for n in case.cluster_names]
        description = (
            "semi-synthetic fMRI (`gacc.datasets.make_semisynthetic_fmri`, "
            f"{options['n_clusters']} overlapping blobs, {options['n_timepoints']} time "
            "points, overlap=0.2, snr=1.0, random_state=0)"
        )

    if downsample > 1:
        step = slice(None, None, downsample)
        data_xyzt = data_xyzt[step, step, step]
        cluster_xyzp = cluster_xyzp[step, step, step]
        mask = mask[step, step, step]
        description += f", every {downsample}th voxel along each axis"
    return {
        "name": name,
        "data_xyzt": data_xyzt,
        "cluster_xyzp": cluster_xyzp,
        "mask": mask,
        "cluster_names": names,
        "description": description,
    }


def make_split(task, case, seed):
    """Hide labels for one task; return the split Bunch."""
    clusters, mask = case["cluster_xyzp"], case["mask"]
    if task == "sparse":
        # Shared slices hide the same voxels from every cluster, so the cover
        # scores (ONMI, Omega) see every held-out voxel. With slices drawn per
        # cluster, few voxels are held out from all clusters at once.
        return splits.hide_slices(clusters, axis=2, n_known_slices=3, mask=mask,
                                  per_cluster=False, random_state=seed)
    if task == "voxels":
        return splits.hide_voxels(clusters, known_fraction=0.05, mask=mask, random_state=seed)
    if task == "region":
        return splits.hide_region(clusters, axis=0, known_fraction=0.5, mask=mask)
    n_hidden = max(2, clusters.shape[3] // 7)
    return splits.hide_clusters(clusters, n_hidden=n_hidden, mask=mask, random_state=seed)


SPLIT_DESCRIPTIONS = {
    "sparse": "labels known on 3 axial slices shared by all clusters, drawn so that "
              "every cluster has members on them when possible "
              "(`hide_slices(axis=2, n_known_slices=3, per_cluster=False)`), scored on "
              "all other slices",
    "voxels": "5 % of the mask's voxels known for every cluster "
              "(`hide_voxels(known_fraction=0.05)`), scored on the rest",
    "region": "labels known on the half of the mask with low indices along axis 0 "
              "(`hide_region(axis=0, known_fraction=0.5)`), scored on the other half",
    "discovery": "max(2, P // 7) clusters removed (`hide_clusters`), the others given in "
                 "full; the hidden clusters are matched one to one (Hungarian matching on "
                 "Dice) with GACC's K - P free clusters or with all k-means/mixture "
                 "components, and scored on every mask voxel",
}


# ---------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------


def methods_for_task(task, requested):
    """Return the methods to run on ``task``, in table order."""
    gacc_methods = list(GACC_VARIANTS) + list(GACC_PREDICTION_VARIANTS)
    if task == "discovery":
        available = gacc_methods + list(DISCOVERY_BASELINES)
    else:
        available = gacc_methods + list(SEMI_SUPERVISED_BASELINES)
    if GACC is None:
        available = [m for m in available if m not in gacc_methods]
    if requested:
        return [m for m in available if m in requested]
    return available


def _fit_gacc(method, case, split, num_clusters, seed, budget):
    """Fit one GACC variant; return the model and its fit seconds.

    The variant's parameters override those of ``--gacc-param``.
    """
    params = {**budget["model"], **GACC_VARIANTS[method]}
    model = GACC(num_clusters=num_clusters, run_eagerly=True, random_state=seed, **params)
    start = time.perf_counter()
    model.fit(case["data_xyzt"], split.cluster_xyzp, mask=case["mask"],
              num_batches=budget["num_batches"], epochs=budget["epochs"])
    return model, time.perf_counter() - start


def run_method(method, case, split, task, seed, budget, fitted):
    """Fit and predict with one method; return (proba of the compared columns, seconds, steps).

    ``fitted`` maps GACC variant names to (model, fit seconds) of the current
    split. A prediction variant reuses the default model from it, or fits
    and stores one.
    """
    data_xyzt, mask = case["data_xyzt"], case["mask"]
    partial = split.cluster_xyzp
    n_given = partial.shape[3]
    n_hidden = split.hidden_clusters.size if task == "discovery" else 0
    num_clusters = n_given + n_hidden

    if method in GACC_VARIANTS or method in GACC_PREDICTION_VARIANTS:
        variant = method if method in GACC_VARIANTS else "gacc"
        if variant not in fitted:
            fitted[variant] = _fit_gacc(variant, case, split, num_clusters, seed, budget)
        model, fit_seconds = fitted[variant]
        prediction_params = GACC_PREDICTION_VARIANTS.get(method, {})
        default_params = {key: getattr(model, key) for key in prediction_params}
        model.set_params(**prediction_params)
        start = time.perf_counter()
        proba = model.predict(data_xyzt, mask=mask)
        seconds = fit_seconds + time.perf_counter() - start
        model.set_params(**default_params)
        if task == "discovery":
            proba = proba[..., n_given:]  # only the free clusters can match hidden ones
        return proba, seconds, model.n_steps_

    start = time.perf_counter()
    if method in DISCOVERY_BASELINES:
        proba = DISCOVERY_BASELINES[method](
            data_xyzt, partial, n_clusters=num_clusters, mask=mask, random_state=seed
        )
    else:
        proba = SEMI_SUPERVISED_BASELINES[method](data_xyzt, partial, mask=mask,
                                                  random_state=seed)
    return proba, time.perf_counter() - start, None


def score(task, case, split, proba):
    """Score predictions on the held-out entries of ``split``."""
    if task == "discovery":
        hidden = split.hidden_clusters
        return evaluate_clusters(split.reference, proba,
                                 mask=split.held_out_mask[..., hidden], match=True)
    return evaluate_clusters(case["cluster_xyzp"], proba, mask=split.held_out_mask)


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------


def run_benchmark(args):
    """Run every dataset, task, method and seed; return result rows and kept predictions."""
    budget = QUICK_BUDGET if args.quick else FULL_BUDGET
    budget = {**budget, "model": {**budget["model"], **args.gacc_params}}
    if args.epochs is not None:
        budget["epochs"] = args.epochs
    if args.num_batches is not None:
        budget["num_batches"] = args.num_batches

    rows = []
    examples = {}  # (dataset, task) -> split, predictions and scores of the first seed
    for dataset in args.datasets:
        case = load_case(dataset, quick=args.quick, data_dir=args.data_dir,
                         downsample=args.downsample, n_clusters=args.n_clusters)
        logger.info("Loaded %s: data %s, clusters %s, %d mask voxels", dataset,
                    case["data_xyzt"].shape, case["cluster_xyzp"].shape, case["mask"].sum())
        for task in args.tasks:
            methods = methods_for_task(task, args.methods)
            for seed_index, seed in enumerate(args.seeds):
                split = make_split(task, case, seed)
                if seed_index == 0:
                    examples[(dataset, task)] = {"case": case, "split": split, "proba": {},
                                                 "scores": {}}
                fitted = {}
                for method in methods:
                    row = {"dataset": dataset, "task": task, "method": method, "seed": seed}
                    try:
                        proba, seconds, n_steps = run_method(method, case, split, task, seed,
                                                             budget, fitted)
                        scores = score(task, case, split, proba)
                    except Exception as error:  # a failed method is reported, not fatal
                        logger.exception("%s / %s / %s / seed %d failed", dataset, task,
                                         method, seed)
                        row.update(error=f"{type(error).__name__}: {error}")
                        rows.append(row)
                        continue
                    row.update(
                        mean_dice=scores["mean_dice"], median_dice=scores["median_dice"],
                        mean_iou=scores["mean_iou"], mean_auc=scores["mean_auc"],
                        onmi=scores["onmi"], omega=scores["omega"], seconds=seconds,
                        n_steps=n_steps, dice=scores["dice"].tolist(),
                    )
                    rows.append(row)
                    logger.info(
                        "%s / %s / %-20s seed %d: Dice %.3f, AUC %.3f, ONMI %.3f, %.1f s",
                        dataset, task, method, seed, scores["mean_dice"],
                        scores["mean_auc"], scores["onmi"], seconds,
                    )
                    if seed_index == 0:
                        examples[(dataset, task)]["proba"][method] = proba
                        examples[(dataset, task)]["scores"][method] = scores
    return rows, examples, budget


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

SUMMARY_COLUMNS = (
    ("mean_dice", "Dice"),
    ("median_dice", "median Dice"),
    ("mean_iou", "IoU"),
    ("mean_auc", "ROC AUC"),
    ("onmi", "ONMI"),
    ("omega", "Omega"),
    ("seconds", "time (s)"),
)


def _format_values(values, digits):
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return "n/a"
    mean = float(np.mean(values))
    if values.size == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {float(np.std(values, ddof=1)):.{digits}f}"


def results_table(rows, dataset, task):
    """Markdown table of one dataset and task: mean ± standard deviation over seeds."""
    selected = [r for r in rows if r["dataset"] == dataset and r["task"] == task]
    methods = list(dict.fromkeys(r["method"] for r in selected))
    header = "| method | " + " | ".join(label for _, label in SUMMARY_COLUMNS) + " | steps |"
    lines = [header, "|" + "---|" * (len(SUMMARY_COLUMNS) + 2)]
    for method in methods:
        method_rows = [r for r in selected if r["method"] == method]
        failed = [r for r in method_rows if "error" in r]
        finished = [r for r in method_rows if "error" not in r]
        if not finished:
            lines.append(f"| {method} | failed: {failed[0]['error']} |")
            continue
        cells = []
        for key, _ in SUMMARY_COLUMNS:
            digits = 1 if key == "seconds" else 3
            cells.append(_format_values([r[key] for r in finished], digits))
        steps = finished[0]["n_steps"]
        cells.append("" if steps is None else str(steps))
        note = f" ({len(failed)} of {len(method_rows)} seeds failed)" if failed else ""
        lines.append(f"| {method}{note} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# Methods drawn in the figures, when run; the ablations appear in the tables only.
PLOTTED_METHODS = ("gacc", "gacc_balanced", "gacc_global_sets", "gacc_supervised_only", "knn",
                   "random_forest", "label_spreading", "kmeans", "gaussian_mixture")


def plot_dice_bars(example, path, title, methods):
    """Save grouped bars of held-out Dice per cluster and method (first seed)."""
    plt = _pyplot()
    scores = example["scores"]
    methods = [m for m in methods if m in scores]
    case, split = example["case"], example["split"]
    if "hidden_clusters" in split:
        names = [case["cluster_names"][i] for i in split.hidden_clusters]
    else:
        names = case["cluster_names"]
    n_clusters = len(names)
    width = 0.8 / max(len(methods), 1)
    figure_width = min(18.0, max(7.0, 2.0 + 0.1 * n_clusters * len(methods)))
    figure, axis = plt.subplots(figsize=(figure_width, 4.2))
    positions = np.arange(n_clusters)
    colours = plt.get_cmap("tab10")
    for m, method in enumerate(methods):
        dice = np.nan_to_num(scores[method]["dice"], nan=0.0)
        axis.bar(positions + (m - (len(methods) - 1) / 2) * width, dice, width,
                 label=method, color=colours(m % 10))
    axis.set_xticks(positions)
    axis.set_xticklabels([_short_name(n) for n in names], rotation=60, ha="right", fontsize=7)
    axis.set_ylabel("held-out Dice")
    axis.set_ylim(0, 1)
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    with atomic_path(path) as tmp_path:
        figure.savefig(tmp_path, dpi=100, format="png")
    plt.close(figure)


def _short_name(name, length=22):
    return name if len(name) <= length else name[: length - 1] + "…"


def plot_example_slices(example, path, title, methods):
    """Save one axial slice: reference clusters and each method's clusters as contours."""
    plt = _pyplot()
    case, split = example["case"], example["split"]
    methods = [m for m in methods if m in example["proba"]]
    if "hidden_clusters" in split:
        reference = split.reference
        held_out = split.held_out_mask[..., split.hidden_clusters]
    else:
        reference = case["cluster_xyzp"]
        held_out = split.held_out_mask
    # The slice with the most held-out members shows the most of what was hidden.
    members = np.nan_to_num(reference) >= 0.5
    z = int(np.argmax((members & held_out).sum(axis=(0, 1, 3))))
    background = np.where(case["mask"][:, :, z], case["data_xyzt"][:, :, z].mean(axis=-1), np.nan)
    shown_clusters = np.flatnonzero(members[:, :, z].any(axis=(0, 1)))[:10]
    colours = plt.get_cmap("tab10")

    figure, axes = plt.subplots(1, len(methods) + 1, figsize=(2.6 * (len(methods) + 1), 3.1))
    panels = [("reference", reference, np.arange(reference.shape[3]))]
    for method in methods:
        matched = example["scores"][method]["matched"]
        panels.append((method, example["proba"][method], matched))
    for axis, (label, volume, columns) in zip(np.atleast_1d(axes), panels):
        axis.imshow(background.T, origin="lower", cmap="gray")
        for colour_index, p in enumerate(shown_clusters):
            column = columns[p]
            if column < 0:
                continue
            layer = np.nan_to_num(volume[:, :, z, column]) >= 0.5
            if layer.any() and not layer.all():
                axis.contour(layer.T.astype(float), levels=[0.5], colors=[colours(colour_index)],
                             linewidths=1.0)
        axis.set_title(label, fontsize=8)
        axis.set_axis_off()
    figure.suptitle(f"{title}, axial slice z={z}", fontsize=9)
    figure.tight_layout()
    with atomic_path(path) as tmp_path:
        figure.savefig(tmp_path, dpi=100, format="png")
    plt.close(figure)


def environment_summary(budget, n_threads):
    """Describe the machine, software and GACC budget behind the timings in one line."""
    import sklearn
    import torch

    threads = "library default threads" if n_threads == 0 else f"{n_threads} thread(s)"
    return (
        f"{platform.platform()}, {os.cpu_count()} CPU cores, {threads}, Python "
        f"{platform.python_version()}, PyTorch {torch.__version__}, "
        f"scikit-learn {sklearn.__version__}; "
        f"GACC budget: num_batches={budget['num_batches']}, epochs={budget['epochs']}"
        + (f", other GACC parameters {budget['model']}" if budget["model"]
           else ", GACC defaults otherwise")
    )


def write_report(rows, examples, budget, args, command):
    """Write quality.md, the results files and the figures into ``args.out``."""
    out = Path(args.out)
    image_dir = out / "img"
    image_dir.mkdir(parents=True, exist_ok=True)

    with atomic_path(out / "quality_results.json") as tmp_path:
        tmp_path.write_text(json.dumps(rows, indent=1, default=float))
    fields = ["dataset", "task", "method", "seed", "mean_dice", "median_dice", "mean_iou",
              "mean_auc", "onmi", "omega", "seconds", "n_steps", "error"]
    with atomic_path(out / "quality_results.csv") as tmp_path:
        with open(tmp_path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    sections = [
        BEGIN_MARKER,
        "",
        f"Generated by `{command}` on {datetime.date.today().isoformat()}.",
        f"Machine and budget: {environment_summary(budget, args.threads)}.",
        f"Seeds: {', '.join(str(s) for s in args.seeds)}. Each figure is mean ± sample "
        "standard deviation over seeds of the per-seed mean over clusters; time is fit "
        "plus prediction of the whole volume, in seconds.",
        "",
    ]
    for dataset in args.datasets:
        case_description = next(
            (e["case"]["description"] for (d, _), e in examples.items() if d == dataset), dataset
        )
        sections += [f"### {dataset}: {case_description}", ""]
        case_names = next(
            (e["case"]["cluster_names"] for (d, _), e in examples.items() if d == dataset), []
        )
        if case_names:
            sections += ["Clusters: " + ", ".join(case_names) + ".", ""]
        for task in args.tasks:
            if not any(r["dataset"] == dataset and r["task"] == task for r in rows):
                continue
            sections += [
                f"#### Task `{task}`: {SPLIT_DESCRIPTIONS[task]}",
                "",
                results_table(rows, dataset, task),
                "",
            ]
            example = examples.get((dataset, task))
            if example and example["scores"]:
                stem = f"quality_{dataset}_{task}"
                title = f"{dataset}, {task}, seed {args.seeds[0]}"
                plot_dice_bars(example, image_dir / f"{stem}_dice.png", title, PLOTTED_METHODS)
                plot_example_slices(example, image_dir / f"{stem}_slices.png", title,
                                    PLOTTED_METHODS)
                sections += [
                    f"![Held-out Dice per cluster, {dataset}, {task}](img/{stem}_dice.png)",
                    "",
                    f"![Reference and predicted clusters on one slice, {dataset}, {task}]"
                    f"(img/{stem}_slices.png)",
                    "",
                ]
    sections += ["Methods:", ""]
    used = list(dict.fromkeys(r["method"] for r in rows))
    sections += [f"- `{m}`: {METHOD_DESCRIPTIONS[m]}" for m in used]
    if GACC is None:
        sections += ["", f"GACC was not run: `import gacc.GACC` failed ({GACC_IMPORT_ERROR})."]
    sections += ["", END_MARKER]
    generated = "\n".join(sections)

    page = out / "quality.md"
    if page.exists() and BEGIN_MARKER in page.read_text() and END_MARKER in page.read_text():
        old = page.read_text()
        pattern = re.compile(re.escape(BEGIN_MARKER) + ".*?" + re.escape(END_MARKER), re.DOTALL)
        text = pattern.sub(lambda _: generated, old, count=1)
    else:
        text = PAGE_HEADER + "\n" + generated + "\n"
    with atomic_path(page) as tmp_path:
        tmp_path.write_text(text)
    return page


PAGE_HEADER = """# Quality benchmark

How well GACC recovers clusters whose labels were hidden from training,
compared with methods a user could pick instead and with GACC minus one of
its loss terms. Every score is computed on held-out entries only: entries
given to training are never scored, and no ground truth is mixed into a
prediction.

Metrics (`gacc.metrics`): Dice and IoU per cluster at a 0.5 threshold
(NaN, and left out of the mean, when reference and prediction are both empty
on the scored entries); ROC AUC per cluster of the membership
probabilities; the overlapping normalised mutual information (ONMI,
McDaid et al.'s NMI_max) and the Omega index of the compared clusters as
overlapping covers, on the voxels scored in every cluster.

Reproduce with `python benchmarks/quality.py` (add `--quick` for a check
that runs in seconds).
"""


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _thread_limits(n_threads):
    """Limit PyTorch, BLAS and OpenMP to ``n_threads`` threads inside the block; 0 changes nothing.

    With more busy threads than free cores, PyTorch's OpenMP workers spin
    while they wait, and a small training step was measured 20 to 40 times
    slower with 2 threads than with 1 on a loaded 2-core machine.
    """
    if n_threads == 0:
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        with threadpool_limits(limits=n_threads):
            yield
    finally:
        torch.set_num_threads(previous)


def _gacc_parameter(text):
    """Parse NAME=VALUE into a (name, value) pair, reading VALUE as JSON when possible."""
    name, separator, value = text.partition("=")
    if not separator or not name.isidentifier():
        raise argparse.ArgumentTypeError(
            f"{text!r} is invalid: use NAME=VALUE, for example class_weight=balanced."
        )
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def build_parser():
    """Return the command-line parser of the quality benchmark."""
    parser = argparse.ArgumentParser(
        description="Score GACC, its ablations and scikit-learn baselines on labels hidden "
                    "from training, and write a markdown report with figures.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="small semi-synthetic data, tiny GACC budget and one seed; "
                             "finishes in well under a minute")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="seeds of the splits and the methods (default: 0 1, or 0 with "
                             "--quick)")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=["sparse", "discovery"],
                        help="tasks to run (default: sparse discovery)")
    parser.add_argument("--methods", nargs="+",
                        choices=list(GACC_VARIANTS) + list(GACC_PREDICTION_VARIANTS)
                        + list(SEMI_SUPERVISED_BASELINES) + list(DISCOVERY_BASELINES),
                        default=None, help="methods to run (default: all that fit the task)")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=None,
                        help="cases to run (default: demo semisynthetic, or semisynthetic "
                             "with --quick)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder of the atlas files for the demo case (default: where "
                             "gacc.datasets looks)")
    parser.add_argument("--n-clusters", type=int, default=20,
                        help="number of Harvard-Oxford regions of the demo case to use as "
                             "clusters, drawn at random with seed 0; 0 uses all of them "
                             "(default: 20)")
    parser.add_argument("--downsample", type=int, default=1,
                        help="keep every n-th voxel along each axis of the data (default: 1)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="GACC epochs (default: 20, or 5 with --quick; gacc.GACC.fit "
                             "defaults to 40)")
    parser.add_argument("--num-batches", type=int, default=None,
                        help="GACC batches per epoch (default: 10, or 4 with --quick)")
    parser.add_argument("--gacc-param", dest="gacc_params", action="append", default=[],
                        type=_gacc_parameter, metavar="NAME=VALUE",
                        help="extra gacc.GACC parameter for every GACC run, for example "
                             "class_weight=balanced or hidden_size=32; repeat for several")
    parser.add_argument("--out", type=Path, default=Path("docs"),
                        help="folder for quality.md, the results files and img/ "
                             "(default: docs)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for PyTorch and the BLAS and OpenMP pools of "
                             "numpy and scikit-learn; 0 keeps the libraries' defaults "
                             "(default: 1, which keeps timings stable when other processes "
                             "share the cores)")
    parser.add_argument("--verbose", action="store_true", help="log every GACC message")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.gacc_params = dict(args.gacc_params)
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1]
    if args.datasets is None:
        args.datasets = ["semisynthetic"] if args.quick else ["demo", "semisynthetic"]
    if args.n_clusters < 0:
        parser.error(f"--n-clusters={args.n_clusters} is invalid: use 0 (all) or more.")
    if args.n_clusters == 0:
        args.n_clusters = None
    if args.threads < 0:
        parser.error(f"--threads={args.threads} is invalid: use 0 (library defaults) or more.")
    if args.downsample < 1:
        parser.error(f"--downsample={args.downsample} is invalid: use an integer >= 1.")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        datefmt="%H:%M:%S")
    if not args.verbose:
        logging.getLogger("gacc").setLevel(logging.WARNING)
    if GACC is None:
        logger.warning("GACC is not importable (%s); running the baselines only.",
                       GACC_IMPORT_ERROR)
    if not args.out.is_dir():
        args.out.mkdir(parents=True)

    command = "python benchmarks/quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    with _thread_limits(args.threads):
        rows, examples, budget = run_benchmark(args)
    page = write_report(rows, examples, budget, args, command.strip())
    logger.info("Wrote %s", page)
    failed = [r for r in rows if "error" in r]
    if failed:
        logger.error("%d of %d runs failed; see the table.", len(failed), len(rows))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

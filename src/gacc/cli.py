"""Command line of GACC: ``gacc demo``, ``gacc fit``, ``gacc predict``, ``gacc evaluate``."""

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

from ._version import __version__
from .exceptions import InvalidInputError, ModelFileError, NonFiniteLossError

logger = logging.getLogger("gacc")

# Errors a user can cause with their input, files or machine; they end the
# command with one line on standard error and exit status 1. OSError covers
# missing files, full disks and folders without write permission. Anything
# else is a bug and keeps its traceback.
USER_ERRORS = (
    InvalidInputError, ModelFileError, NonFiniteLossError, OSError, ValueError,
    ModuleNotFoundError, MemoryError,
)
# Exit status of a command stopped with Ctrl+C, as shells report SIGINT.
INTERRUPTED_STATUS = 130
DEFAULT_CHECKPOINT_EVERY = 100


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _non_negative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def _add_training_options(parser, *, default_clusters):
    group = parser.add_argument_group("training")
    group.add_argument("--num-clusters", "-k", type=_positive_int, default=default_clusters,
                       help="K, clusters to predict: the P given ones first, then K - P "
                            "discovered ones (default: "
                            + ("50, or P when P is larger" if default_clusters is None
                               else "%(default)s") + ")")
    group.add_argument("--epochs", type=_positive_int, default=40,
                       help="training epochs (default: %(default)s)")
    group.add_argument("--num-batches", type=_positive_int, default=10,
                       help="training steps per epoch (default: %(default)s)")
    group.add_argument("--set-sampling", choices=("local", "global"), default="local",
                       help="how sets are drawn in training and prediction: from small cubes "
                            "of 5 voxels per side, or from the whole foreground "
                            "(default: %(default)s)")
    group.add_argument("--set-size", type=_positive_int, default=8,
                       help="N, voxels per set (default: %(default)s)")
    group.add_argument("--batch-size", type=_positive_int, default=32,
                       help="B, sets per training step (default: %(default)s)")
    group.add_argument("--learning-rate", type=float, default=1e-3,
                       help="generator learning rate (default: %(default)s)")
    for term, default, meaning in (
        ("adversarial", 0.1, "adversarial loss"),
        ("xc", 0.01, "voxel-to-cluster (entity-to-cluster) predictor error"),
        ("cx", 0.1, "cluster-to-entity predictor error"),
    ):
        group.add_argument(f"--{term}-weight", type=_non_negative_float, default=default,
                           help=f"weight of the {meaning} in the generator objective; "
                                "0 turns it off (default: %(default)s)")
    group.add_argument("--compile", action="store_true",
                       help="compile the networks with torch.compile (run_eagerly=False)")
    _add_device_options(group)

    network = parser.add_argument_group("network size")
    for option, default, meaning in (
        ("--hidden-size", 64, "width of the generator's transformer"),
        ("--column-hidden-size", 32, "width of the discriminator and the cooperative predictors"),
        ("--num-heads", 4, "attention heads; must divide both widths"),
        ("--num-layers", 2, "transformer blocks of the generator"),
        ("--prediction-repeats", 8, "random sets each voxel is predicted in, averaged"),
        ("--prediction-batch-size", 4096, "sets per forward pass at prediction; halved "
                                          "automatically when the device runs out of memory"),
    ):
        network.add_argument(option, type=_positive_int, default=default,
                             help=f"{meaning} (default: %(default)s)")


def _add_device_options(group):
    group.add_argument("--device", default="auto",
                       help="torch device: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N "
                            "or mps (default: %(default)s)")
    group.add_argument("--seed", type=int, default=0,
                       help="random seed; CPU runs with the same seed repeat exactly "
                            "(default: %(default)s)")


def _add_output_options(parser, *, with_defaults):
    parser.add_argument("-v", "--verbose", action="count",
                        default=0 if with_defaults else argparse.SUPPRESS,
                        help="log more (-v: info, -vv: debug)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        default=False if with_defaults else argparse.SUPPRESS,
                        help="show no progress bar and log only errors")


def build_parser():
    """Build the ``gacc`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="gacc",
        description="GACC: semi-supervised, overlapping clustering of 4D volumes "
                    "(fMRI runs or stacks of brain maps) with partly known clusters.",
    )
    parser.add_argument("--version", action="version", version=f"gacc {__version__}")
    _add_output_options(parser, with_defaults=True)
    # The same options after the command name, as in "gacc fit ... -q"; there
    # they have no default, so that they do not reset a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    _add_output_options(common, with_defaults=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo", parents=[common], help="fit and evaluate GACC on the real atlas demo case",
        description="Build (or reuse) the demo case: probabilistic Juelich maps as data and "
                    "Harvard-Oxford regions as clusters on a 3 mm MNI grid. Keep each "
                    "cluster's labels on a few axial slices, fit GACC, predict the rest, "
                    "and write NIfTI outputs, held-out scores and a figure.",
    )
    demo.add_argument("--output-dir", "-o", type=Path, default=Path("gacc_demo"),
                      help="folder for the outputs (default: %(default)s)")
    demo.add_argument("--given-clusters", type=int, default=28,
                      help="P, Harvard-Oxford regions given to the model, the largest first; "
                           "0 gives all 110 (default: %(default)s)")
    demo.add_argument("--known-slices", type=_positive_int, default=6,
                      help="axial slices per cluster whose labels are kept (default: "
                           "%(default)s)")
    demo.add_argument("--data-dir", type=Path, default=None,
                      help="cache folder of the demo case (default: $GACC_DATA or ~/gacc_data)")
    _add_training_options(demo, default_clusters=None)

    fit = commands.add_parser(
        "fit", parents=[common], help="train a model on a 4D NIfTI volume and known clusters",
        description="Train GACC on DATA (4D NIfTI, X x Y x Z x T) with the known clusters in "
                    "CLUSTERS: a 4D probabilistic atlas (thresholded) or a 3D label image "
                    "(one cluster per label). NaN entries of a 4D cluster image are unknown.",
    )
    fit.add_argument("data", type=Path, help="4D NIfTI data (.nii or .nii.gz)")
    fit.add_argument("clusters", type=Path, help="known clusters (NIfTI, 4D or 3D labels)")
    fit.add_argument("--output", "-o", type=Path, default=Path("gacc_model.pt"),
                     help="model file to write (default: %(default)s)")
    fit.add_argument("--mask", type=Path, help="3D brain mask (NIfTI); default: voxels whose "
                                               "data are not all zero")
    fit.add_argument("--threshold", type=float, default=0.5,
                     help="threshold of probabilistic cluster maps (default: %(default)s)")
    fit.add_argument("--labels", type=Path,
                     help="CSV or TSV label table (index, name) naming the clusters")
    fit.add_argument("--resample", action="store_true",
                     help="resample clusters and mask onto the data grid when the grids differ")
    continuing = fit.add_mutually_exclusive_group()
    continuing.add_argument("--warm-start", action="store_true",
                            help="train the model in --output for --epochs x --num-batches "
                                 "more steps instead of starting afresh")
    continuing.add_argument("--resume", type=Path, metavar="CHECKPOINT",
                            help="continue an interrupted fit from CHECKPOINT up to --epochs x "
                                 "--num-batches steps in all; the model options are read from "
                                 "the file, and the result equals an uninterrupted run")
    fit.add_argument("--checkpoint", type=Path, metavar="PATH",
                     help="save the model to PATH every --checkpoint-every steps and when "
                          "training ends, fails or is interrupted; PATH may contain {step}, in "
                          "which case only the newest checkpoint file is kept")
    fit.add_argument("--checkpoint-every", type=_positive_int, metavar="N",
                     help=f"steps between checkpoints (default: {DEFAULT_CHECKPOINT_EVERY})")
    _add_training_options(fit, default_clusters=50)

    predict = commands.add_parser(
        "predict", parents=[common], help="predict cluster memberships with a trained model",
        description="Predict memberships of every voxel of DATA in the model's K clusters; "
                    "writes a 4D probability image (X x Y x Z x K) with the input's affine "
                    "and header, and optionally the thresholded clusters.",
    )
    predict.add_argument("model", type=Path, help="model file written by 'gacc fit'")
    predict.add_argument("data", type=Path, help="4D NIfTI data on the model's grid")
    predict.add_argument("--output", "-o", type=Path, default=Path("gacc_proba.nii.gz"),
                         help="probability image to write (default: %(default)s)")
    predict.add_argument("--clusters-output", type=Path,
                         help="also write the clusters thresholded at --threshold (uint8, 4D)")
    predict.add_argument("--threshold", type=float, default=0.5,
                         help="membership threshold for --clusters-output (default: %(default)s)")
    predict.add_argument("--mask", type=Path, help="3D brain mask (NIfTI)")
    predict.add_argument("--device", default="auto", help="torch device (default: %(default)s)")
    predict.add_argument("--prediction-batch-size", type=_positive_int,
                         help="sets per forward pass (default: the model's); halved "
                              "automatically when the device runs out of memory")

    evaluate = commands.add_parser(
        "evaluate", parents=[common], help="score predicted clusters against reference clusters",
        description="Compute Dice, IoU, ROC AUC and overlapping NMI of PREDICTION (4D "
                    "probabilities) against REFERENCE (4D or 3D labels). The first P "
                    "predicted clusters are compared with the P reference clusters, or "
                    "matched one to one by Dice with --match.",
    )
    evaluate.add_argument("prediction", type=Path, help="4D probability image (X x Y x Z x K)")
    evaluate.add_argument("reference", type=Path, help="reference clusters (NIfTI)")
    evaluate.add_argument("--mask", type=Path,
                          help="3D mask of the voxels to score, or a 4D mask of the entries "
                               "(for example those held out from training)")
    evaluate.add_argument("--threshold", type=float, default=0.5,
                          help="membership threshold (default: %(default)s)")
    evaluate.add_argument("--match", action="store_true",
                          help="match clusters one to one by Dice (for discovered clusters)")
    evaluate.add_argument("--output", "-o", type=Path, help="write the scores as JSON")
    return parser


def _model_params(args):
    return {
        "num_clusters": args.num_clusters,
        "set_size": args.set_size,
        "set_sampling": args.set_sampling,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "adversarial_weight": args.adversarial_weight,
        "xc_weight": args.xc_weight,
        "cx_weight": args.cx_weight,
        "run_eagerly": not args.compile,
        "device": args.device,
        "random_state": args.seed,
        "hidden_size": args.hidden_size,
        "column_hidden_size": args.column_hidden_size,
        "num_heads": args.num_heads,
        "num_layers": args.num_layers,
        "prediction_repeats": args.prediction_repeats,
        "prediction_batch_size": args.prediction_batch_size,
    }


def _run_demo(args):
    from .demo import run_demo

    params = _model_params(args)
    summary = run_demo(
        args.output_dir, epochs=args.epochs, num_batches=args.num_batches,
        n_given_clusters=args.given_clusters or None, n_known_slices=args.known_slices,
        data_dir=args.data_dir, progress=not args.quiet,
        **params,
    )
    print(f"Held-out Dice (mean over {summary['n_clusters_given']} clusters): "
          f"{summary['mean_dice']:.3f}  (median {summary['median_dice']:.3f}, "
          f"ROC AUC {summary['mean_auc']:.3f}, overlapping NMI {summary['onmi']:.3f})")
    print(f"Fit {summary['fit_seconds']:.1f} s for {summary['n_steps']} steps, predict "
          f"{summary['predict_seconds']:.1f} s on {summary['device']}; "
          f"{100 * summary['known_share']:.1f}% of the cluster entries were known.")
    print(f"Outputs in {args.output_dir}/: " + ", ".join(
        Path(path).name for path in summary["paths"].values()))
    return 0


def _check_outputs(outputs, inputs):
    """Reject unusable output paths before any data are loaded or any training runs.

    ``outputs`` and ``inputs`` are lists of (option name, path or None).
    """
    input_paths = {Path(path).resolve(): name for name, path in inputs if path is not None}
    for name, path in outputs:
        if path is None:
            continue
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"{name} {str(path)!r} is a folder; give a file name.")
        folder = path.parent
        if not folder.is_dir():
            what = "is a file, not a folder" if folder.exists() else "does not exist"
            raise FileNotFoundError(
                f"{name} {str(path)!r}: folder {str(folder)!r} {what}; create the folder or "
                "choose another path."
            )
        if not os.access(folder, os.W_OK):
            raise PermissionError(
                f"{name} {str(path)!r}: folder {str(folder)!r} is not writable; choose "
                "another path."
            )
        if path.resolve() in input_paths:
            raise ValueError(
                f"{name} {str(path)!r} is also the input {input_paths[path.resolve()]}; "
                "writing there would overwrite it. Choose another output path."
            )


def _run_fit(args):
    from .callbacks import ModelCheckpoint, ProgressBar
    from .demo import write_history
    from .estimator import GACC
    from .nifti import load_clusters, load_data, load_mask

    if args.output.name.endswith((".nii", ".nii.gz")):
        raise ValueError(
            f"--output {str(args.output)!r} names a NIfTI file, but 'gacc fit' writes a model "
            "file; use a name ending in .pt, such as gacc_model.pt."
        )
    inputs = [("DATA", args.data), ("CLUSTERS", args.clusters), ("--mask", args.mask),
              ("--labels", args.labels), ("--resume", args.resume)]
    _check_outputs([("--output", args.output), ("--checkpoint", args.checkpoint)], inputs)
    data_xyzt, data_img = load_data(args.data)
    cluster_xyzp, names = load_clusters(args.clusters, threshold=args.threshold,
                                        labels=args.labels, reference=data_img,
                                        resample=args.resample)
    mask = None
    if args.mask is not None:
        mask = load_mask(args.mask, reference=data_img, resample=args.resample)

    num_steps = args.epochs * args.num_batches
    if args.resume is not None:
        model = GACC.load(args.resume, device=args.device)
        num_steps -= model.n_steps_
        print(f"Resuming from {args.resume} at step {model.n_steps_}; "
              f"{max(num_steps, 0)} steps left.")
    elif args.warm_start:
        model = GACC.load(args.output, device=args.device)
        if args.num_clusters != model.num_clusters:
            logger.warning(
                "--num-clusters %d is ignored: the model in %s has K=%d clusters, which "
                "continued training keeps.", args.num_clusters, args.output, model.num_clusters,
            )
    else:
        model = GACC(**_model_params(args))

    callbacks = [] if args.quiet else [ProgressBar()]
    checkpoint = None
    if args.checkpoint is not None:
        every_n_steps = args.checkpoint_every or DEFAULT_CHECKPOINT_EVERY
        checkpoint = ModelCheckpoint(args.checkpoint, every_n_steps=every_n_steps)
        callbacks.append(checkpoint)
    if num_steps > 0:
        epochs, num_batches = args.epochs, args.num_batches
        if args.resume is not None:
            # Steps depend only on the model's state, not on epoch boundaries,
            # so the remaining steps run as one epoch.
            epochs, num_batches = 1, num_steps
        try:
            model.fit(data_xyzt, cluster_xyzp, mask=mask, num_batches=num_batches,
                      epochs=epochs, callbacks=callbacks,
                      warm_start=args.warm_start or args.resume is not None)
        except KeyboardInterrupt:
            return _save_interrupted_fit(model, checkpoint, args)
        except (NonFiniteLossError, MemoryError) as error:
            if checkpoint is not None and checkpoint.last_step_ is not None:
                error.args = (f"{error} The model of step {checkpoint.last_step_} was saved "
                              f"to {checkpoint.last_path_}.",)
            raise

    model.save(args.output)
    history_path = args.output.with_name(args.output.stem + "_history.csv")
    write_history(model.history_, history_path)
    last = {name: values[-1] for name, values in model.history_.items()}
    print(f"Trained {model.n_steps_} steps on {len(names)} known clusters "
          f"(K={model.num_clusters}); final supervised loss "
          f"{last.get('supervised', float('nan')):.4f}.")
    print(f"Model written to {args.output}; loss history to {history_path}.")
    return 0


def _save_interrupted_fit(model, checkpoint, args):
    """Save the model of the last completed step after Ctrl+C and print where it is."""
    if checkpoint is not None and checkpoint.last_step_ == model.n_steps_:
        path = checkpoint.last_path_
    elif getattr(model, "n_steps_", 0) > 0:
        path = args.checkpoint if args.checkpoint is not None else args.output
        path = Path(str(path).format(step=model.n_steps_))
        model.save(path)
    else:
        print("gacc fit: interrupted before the first training step; nothing was saved.",
              file=sys.stderr)
        return INTERRUPTED_STATUS
    print(f"gacc fit: interrupted after {model.n_steps_} steps; the model of the last completed "
          f"step is saved in {path}. Continue with the same command and --resume {path}.",
          file=sys.stderr)
    return INTERRUPTED_STATUS


def _run_predict(args):
    from .estimator import GACC
    from .nifti import load_data, load_mask, save_img

    if not 0 < args.threshold <= 1:
        raise ValueError(f"--threshold {args.threshold} must lie in (0, 1].")
    _check_outputs(
        [("--output", args.output), ("--clusters-output", args.clusters_output)],
        [("MODEL", args.model), ("DATA", args.data), ("--mask", args.mask)],
    )
    # NOTE: model files store the fitted grid's shape but not its affine, so data of the
    # same shape in another space are not detected here.
    model = GACC.load(args.model, device=args.device)
    if args.prediction_batch_size is not None:
        model.prediction_batch_size = args.prediction_batch_size
    data_xyzt, data_img = load_data(args.data)
    mask = None if args.mask is None else load_mask(args.mask, reference=data_img)
    proba_xyzk = model.predict(data_xyzt, mask=mask)
    save_img(proba_xyzk, data_img, args.output)
    print(f"Memberships in {model.num_clusters} clusters written to {args.output}.")
    if args.clusters_output is not None:
        clusters = (proba_xyzk >= args.threshold).astype(np.uint8)
        save_img(clusters, data_img, args.clusters_output)
        print(f"Clusters thresholded at {args.threshold} written to {args.clusters_output}.")
    return 0


def _run_evaluate(args):
    from .metrics import evaluate_clusters
    from .nifti import load_clusters

    _check_outputs([("--output", args.output)],
                   [("PREDICTION", args.prediction), ("REFERENCE", args.reference),
                    ("--mask", args.mask)])
    proba_xyzk, proba_img = _load_prediction(args.prediction)
    reference, names = load_clusters(args.reference, threshold=args.threshold,
                                     reference=proba_img)
    mask = None
    if args.mask is not None:
        mask = _load_score_mask(args.mask, proba_img)
    scores = evaluate_clusters(reference, proba_xyzk, mask=mask, threshold=args.threshold,
                               match=args.match)
    print(f"Mean Dice {scores['mean_dice']:.3f} (median {scores['median_dice']:.3f}), "
          f"mean IoU {scores['mean_iou']:.3f}, mean ROC AUC {scores['mean_auc']:.3f}, "
          f"overlapping NMI {scores['onmi']:.3f} over {len(names)} reference clusters.")
    for name, dice in zip(names, scores["dice"]):
        print(f"  {name}: Dice {dice:.3f}")
    if args.output is not None:
        serialisable = {
            key: (value.tolist() if isinstance(value, np.ndarray) else value)
            for key, value in scores.items()
        }
        serialisable["names"] = names
        args.output.write_text(json.dumps(serialisable, indent=2, default=float))
    return 0


def _load_score_mask(path, reference_img):
    """Load a 3D voxel mask, or a 4D mask of cluster entries, on the prediction's grid."""
    from .nifti import load_data_img, load_mask

    img = load_data_img(path, allow_3d=True)
    if img.shape[3] == 1:
        return load_mask(img, reference=reference_img)
    if img.shape[:3] != reference_img.shape[:3]:
        raise InvalidInputError(
            f"The mask {str(path)!r} has spatial shape {img.shape[:3]} but the prediction has "
            f"{reference_img.shape[:3]}; give a mask on the prediction's grid."
        )
    return np.asarray(img.dataobj) > 0


def _load_prediction(path):
    from .nifti import load_data_img

    img = load_data_img(path)
    proba = np.asarray(img.dataobj, dtype=np.float32)
    if np.isnan(proba).any() or proba.min() < 0 or proba.max() > 1:
        raise InvalidInputError(
            f"{str(path)!r} must hold membership probabilities in [0, 1], as written by "
            "'gacc predict'."
        )
    return proba, img


def _configure_logging(args):
    """Send the engine's log records to standard error; return a function that undoes it.

    The handler goes on the ``gacc`` logger, not the root logger, so that
    ``main`` can run several times in one process (as in tests) without
    stacking handlers or changing how other libraries log.
    """
    if args.quiet:
        level = logging.ERROR
    else:
        level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    previous_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)

    def restore():
        logger.removeHandler(handler)
        logger.setLevel(previous_level)

    return restore


COMMANDS = {
    "demo": _run_demo,
    "fit": _run_fit,
    "predict": _run_predict,
    "evaluate": _run_evaluate,
}


def main(argv=None):
    """Run the ``gacc`` command line and return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "fit" and args.checkpoint is None and args.checkpoint_every is not None:
        parser.error("--checkpoint-every needs --checkpoint PATH")
    restore_logging = _configure_logging(args)
    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as error:
        # One line, because messages that print an affine span several.
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"gacc {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"gacc {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED_STATUS
    finally:
        restore_logging()


if __name__ == "__main__":
    sys.exit(main())

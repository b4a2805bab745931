"""Speed and memory benchmark of GACC fit and predict.

Fits on a semi-synthetic volume the size of the research example of GACC
(53 x 63 x 46 voxels, T = 75, P = 28 given clusters, K = 50) with
``num_batches=10, epochs=40``, then predicts the whole volume, and writes
the figures into ``docs/speed.md``. Each configuration runs in its own
process so that its peak memory is its own.

Usage::

    python benchmarks/speed.py                   # eager and compiled, on the best device
    python benchmarks/speed.py --modes eager --device cpu
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

SHAPE = (53, 63, 46)
N_TIMEPOINTS = 75
N_GIVEN = 28
NUM_CLUSTERS = 50
NUM_BATCHES = 10
EPOCHS = 40
TARGETS = {"fit_seconds": 60.0, "predict_seconds": 10.0}


def _machine():
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, Python {platform.python_version()}"


def run_one(mode, device, seed):
    """Fit and predict once; return a dict of timings (runs in a child process)."""
    import torch

    import gacc
    from gacc.datasets import make_semisynthetic_fmri

    case = make_semisynthetic_fmri(shape=SHAPE, n_timepoints=N_TIMEPOINTS, n_clusters=N_GIVEN,
                                   random_state=seed)
    model = gacc.GACC(num_clusters=NUM_CLUSTERS, run_eagerly=(mode == "eager"),
                      min_max_scale_range=[0.0, 1.0], device=device, random_state=seed)
    start = time.perf_counter()
    model.fit(case.data_xyzt, case.cluster_xyzp, mask=case.mask, num_batches=NUM_BATCHES,
              epochs=EPOCHS)
    if model.device_.type == "cuda":
        torch.cuda.synchronize()
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    proba = model.predict(case.data_xyzt, mask=case.mask)
    predict_seconds = time.perf_counter() - start
    n_steps = NUM_BATCHES * EPOCHS
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "mode": mode,
        "device": str(model.device_),
        "fit_seconds": fit_seconds,
        "steps_per_second": n_steps / fit_seconds,
        "training_voxels_per_second": n_steps * model.batch_size * model.set_size / fit_seconds,
        "predict_seconds": predict_seconds,
        "predicted_voxels_per_second": int(case.mask.sum()) / predict_seconds,
        "foreground_voxels": int(case.mask.sum()),
        "peak_rss_mib": peak_rss_mib,
        "final_losses_finite": bool(all(v[-1] == v[-1] for v in model.history_.values())),
        "prediction_finite": bool((proba == proba).all()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if model.device_.type == "cuda":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["gpu"] = torch.cuda.get_device_name(model.device_)
    return result


def _read_results(path):
    """Return the results already recorded in ``path`` (a JSON file), or []."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return []


def write_report(results, path):
    """Write the results table with the targets into a markdown page."""
    lines = [
        "# Speed benchmark",
        "",
        f"Written by `python benchmarks/speed.py`: a semi-synthetic volume of "
        f"{SHAPE[0]} x {SHAPE[1]} x {SHAPE[2]} voxels, T = {N_TIMEPOINTS}, "
        f"P = {N_GIVEN} given clusters, K = {NUM_CLUSTERS}, `num_batches={NUM_BATCHES}, "
        f"epochs={EPOCHS}` ({NUM_BATCHES * EPOCHS} training steps), then a prediction of "
        "every foreground voxel. Peak memory is the process's maximum resident set size.",
        "",
        f"Machine: {_machine()}.",
        "",
        "| mode | device | torch threads | fit (s) | steps/s | training voxels/s | "
        "predict (s) | predicted voxels/s | peak RSS (MiB) | finite |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['mode']} | {r['device']} | {r['threads']} | {r['fit_seconds']:.1f} | "
            f"{r['steps_per_second']:.2f} | {r['training_voxels_per_second']:.0f} | "
            f"{r['predict_seconds']:.2f} | {r['predicted_voxels_per_second']:.0f} | "
            f"{r['peak_rss_mib']:.0f} | "
            f"{'yes' if r['final_losses_finite'] and r['prediction_finite'] else 'NO'} |"
        )
    lines += [
        "",
        f"Targets on a 2-core CPU: the whole fit under {TARGETS['fit_seconds']:.0f} s and the "
        f"full-volume predict under {TARGETS['predict_seconds']:.0f} s.",
        "",
        "The compiled row includes the time `torch.compile` spends compiling; a first run "
        "with an empty compile cache takes minutes longer on this CPU. Where other "
        "processes keep the cores busy, PyTorch's default of one thread per core can make "
        "steps many times slower, which is why rows give the thread count. No GPU was "
        "available when these rows were recorded; on a CUDA machine the same command adds "
        "its GPU rows with peak GPU memory.",
        "",
    ]
    Path(path).write_text("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"],
                        choices=["eager", "compiled"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "docs" / "speed.md")
    parser.add_argument("--threads", type=int, nargs="+", default=[None],
                        help="torch CPU threads of each run (default: torch's own choice)")
    parser.add_argument("--append", action="store_true",
                        help="add the rows to those already in the page's JSON record")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        if args.threads[0] is not None:
            import torch

            torch.set_num_threads(args.threads[0])
        print(json.dumps(run_one(args.child, args.device, args.seed)))
        return 0

    record = args.out.with_suffix(".json")
    results = _read_results(record) if args.append else []
    for mode in args.modes:
        for threads in args.threads:
            command = [sys.executable, __file__, "--child", mode, "--device", args.device,
                       "--seed", str(args.seed)]
            if threads is not None:
                command += ["--threads", str(threads)]
            completed = subprocess.run(command, check=True, capture_output=True, text=True)
            result = json.loads(completed.stdout.strip().splitlines()[-1])
            print(json.dumps(result))
            results.append(result)
    record.write_text(json.dumps(results, indent=2))
    write_report(results, args.out)
    print(f"Wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""End-to-end check of the quality benchmark's quick mode (benchmarks/quality.py)."""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
SCRIPT = REPOSITORY / "benchmarks" / "quality.py"

GACC_METHODS = ["gacc", "gacc_no_adversarial", "gacc_no_xc", "gacc_no_cx",
                "gacc_supervised_only", "gacc_global_sets", "gacc_xc_0.1", "gacc_balanced",
                "gacc_single_draw"]
SPARSE_METHODS = GACC_METHODS + ["knn", "random_forest", "label_spreading"]
DISCOVERY_METHODS = GACC_METHODS + ["kmeans", "gaussian_mixture"]


def table_rows(text, heading):
    """Return {method: cells} of the markdown table that follows ``heading``."""
    section = text.split(heading, 1)[1]
    rows = {}
    for line in section.splitlines()[2:]:
        if line.startswith("#### "):
            break
        if not line.startswith("| ") or line.startswith("| method") or line.startswith("|---"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow
def test_quick_run_writes_full_table(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    page = tmp_path / "quality.md"
    assert page.is_file()
    text = page.read_text()

    for task, methods in (("sparse", SPARSE_METHODS), ("discovery", DISCOVERY_METHODS)):
        rows = table_rows(text, f"#### Task `{task}`")
        assert sorted(rows) == sorted(methods)
        for method, cells in rows.items():
            # Dice, median Dice, IoU, ROC AUC, ONMI, Omega and time, each a finite number.
            numbers = [re.match(r"^-?\d+\.\d+", cell) for cell in cells[:7]]
            assert all(numbers), f"{task} / {method}: {cells}"
            assert all(math.isfinite(float(n.group())) for n in numbers)
        for kind in ("dice", "slices"):
            assert (tmp_path / "img" / f"quality_semisynthetic_{task}_{kind}.png").is_file()

    assert (tmp_path / "quality_results.csv").is_file()
    assert (tmp_path / "quality_results.json").is_file()


@pytest.mark.slow
def test_quick_run_keeps_text_around_results(tmp_path):
    page = tmp_path / "quality.md"
    page.write_text("# Notes\n\nHand-written.\n\n<!-- quality-results:begin -->\nold\n"
                    "<!-- quality-results:end -->\n\nAfter.\n")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--tasks", "sparse", "--methods", "knn",
         "--out", str(tmp_path)],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = page.read_text()
    assert text.startswith("# Notes\n\nHand-written.")
    assert text.rstrip().endswith("After.")
    assert "\nold\n" not in text
    assert "| knn |" in text

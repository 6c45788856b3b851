"""benchmarks/calibrate_digits.py: the in-process trainer behind the digits calibration and the
quick DSSN tries (``--method dssn``), on a few tiny scenes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "calibrate_digits.py"
TINY = [
    "--digits", "n_train=32", "n_val=6", "scene_size=32", "size_min=14", "size_max=20",
    "--crop", "32", "--batch", "2", "--threads", "1", "--eval-every", "2",
]  # fmt: skip


def calibrate(*args: str, base: list[str] = TINY) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *base, *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("method", ["supervised", "dssn"])
def test_runs_the_iterations_and_prints_the_per_class_table(method):
    run = calibrate("--labeled", "split", "--iters", "4", "--method", method, "--burn-in", "2")
    assert run.returncode == 0, run.stderr
    assert "not writable" not in run.stderr  # decoded scenes are copied before torch wraps them
    out = run.stdout
    # 32 scenes at 1/16: the first 2 are labeled, the other 30 DSSN's unlabeled pool
    assert out.startswith("2 training scenes (split labeled), 6 val")
    assert ("dssn (dssn, burn-in 2)" in out) == (method == "dssn")
    scored = "teacher" if method == "dssn" else "student"  # the EMA teacher, as Ray runs report
    assert f"(split labeled, {scored} IoU)" in out
    assert re.search(r"^iter\s+2 .*val mIoU", out, re.M)
    dssn_steps = 2 if method == "dssn" else 0  # after the 2 burn-in iterations
    assert f"final: 4 iterations ({dssn_steps} DSSN steps)" in out
    assert (
        len(re.findall(r"^\s+\d\s+(\d+\.\d|nan)$", out, re.M)) == 10
    )  # digits 0-9 (nan: none in val)
    assert re.search(r"mIoU\s+\d+\.\d", out)


def test_dssn_needs_the_split():
    run = calibrate("--labeled", "all", "--iters", "2", "--method", "dssn")
    assert run.returncode != 0 and "needs --labeled split" in run.stderr


def test_dssn_burn_in_defaults_to_the_configs_burn_in_epochs():
    # configs/digits.yaml has burn-in epochs: without --burn-in they are counted in iterations
    # (epochs x iters_per_epoch), and after them every step is a real DSSN step
    run = calibrate(
        "--labeled", "split", "--iters", "5", "--method", "dssn",
        "dssn.burn_in_epochs=1", "train.iters_per_epoch=3",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "dssn (dssn, burn-in 3)" in run.stdout
    assert "final: 5 iterations (2 DSSN steps)" in run.stdout


def test_batch_defaults_to_the_global_batch_of_the_configs_workers():
    # one process plays a Ray run's workers: without --batch a step sees all of their scenes
    i = TINY.index("--batch")
    run = calibrate(
        "--iters", "2", "train.workers=3", "data.batch_size=1", base=TINY[:i] + TINY[i + 2 :]
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "| batch 3 crop 32 |" in run.stdout

"""The scripts in experiments/: their configs from flags, and a real ``ray job submit``.

The job test starts its own Ray head node (``ray start --head`` on free ports and a private
temp dir, token authentication on, as on a cluster), submits
``experiments/tune_digits.py --smoke-test`` with ``ray job submit`` and checks the result table.
It stops only that head's processes (by pid), never other Ray instances on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from dssn.tune.experiment import build_config, build_parser, find_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HEAD_CPUS = 4  # logical: 2 smoke trials x (0.5 worker + 1 data + 0.5 trial)
JOB_TIMEOUT_S = 900


def parse(tune: bool, *argv: str) -> argparse.Namespace:
    return build_parser("test", tune).parse_args(list(argv))


def test_tune_voc_flags_reach_the_config():
    args = parse(
        True, "--data", "s3://bucket/shards/", "--split", "92", "--storage", "s3://bucket/runs",
        "--num-samples", "32", "--max-epochs", "40", "--max-concurrent", "2", "--workers", "2",
        "--name", "voc-search", "tune.grace_period=4",
    )  # fmt: skip
    cfg = build_config("voc_r101.yaml", args, tune=True)
    assert cfg.data.root == "s3://bucket/shards/voc-92"  # the layout of `dssn prepare voc`
    assert cfg.tune.storage_path == "s3://bucket/runs" == cfg.train.storage
    assert (cfg.tune.num_samples, cfg.tune.max_epochs, cfg.tune.max_concurrent_trials) == (
        32, 40, 2,
    )  # fmt: skip
    assert cfg.tune.name == "voc-search" and cfg.tune.grace_period == 4
    assert cfg.train.workers == 2 and cfg.train.gpus_per_worker == 1  # from voc_r101.yaml
    assert cfg.model.backbone == "resnet101_deep"


def test_storage_defaults_to_the_cluster_variable(monkeypatch):
    monkeypatch.setenv("DSSN_STORAGE", "gs://bucket/dssn-runs")
    cfg = build_config("cityscapes_r101.yaml", parse(True, "--data", "/nfs/shards"), tune=True)
    assert cfg.tune.storage_path == "gs://bucket/dssn-runs"
    assert cfg.data.root == "/nfs/shards"
    assert cfg.dssn.variant == "cityscapes"


def test_train_script_names_the_train_run():
    cfg = build_config("voc_r101.yaml", parse(False, "--name", "r101-92", "--epochs", "3"), False)
    assert cfg.train.name == "r101-92" and cfg.train.epochs == 3


def test_configs_are_found_away_from_the_repository(tmp_path, monkeypatch):
    # `ray submit` copies the script to the head node's home and runs it there
    monkeypatch.chdir(tmp_path)
    assert find_config("voc_r101.yaml") == ROOT / "configs" / "voc_r101.yaml"


def test_a_script_checks_the_shards_before_any_trial(tmp_path, capsys, monkeypatch):
    from dssn.tune import experiment

    monkeypatch.setattr(experiment, "connect", lambda address: pytest.fail("Ray was joined"))
    missing = tmp_path / "shards"
    argv = ["--data", str(missing), "--split", "92", "--storage", str(tmp_path / "runs")]
    assert experiment.main("voc_r101.yaml", True, "test", argv) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"data error: {missing}/voc-92/dataset.json: not found (prepare the dataset with `dssn prepare`)\n"
    )


def test_smoke_config_is_tiny_and_uses_generated_digits(tmp_path):
    args = parse(True, "--smoke-test", "--storage", str(tmp_path))
    cfg = build_config("voc_r101.yaml", args, tune=True)
    assert cfg.data.root == f"{tmp_path}/smoke-digits"
    assert (tmp_path / "smoke-digits" / "dataset.json").is_file()
    assert cfg.model.backbone == "tiny" and cfg.data.crop_size == 32
    assert cfg.train.gpus_per_worker == 0 and cfg.train.workers == 1
    assert cfg.model.pretrained is None
    assert cfg.tune.num_samples == 2 and cfg.tune.name == "voc_r101-smoke"


# ----------------------------------------------------------------------------- job submit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pids_using(marker: str) -> list[int]:
    """Processes whose command line mentions ``marker`` (our head's private temp dir), and
    their descendants (a job's driver names no Ray path)."""
    parents: dict[int, int] = {}
    matched = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        pid = int(proc.name)
        parents[pid] = int(stat.rsplit(")", 1)[1].split()[1])  # field 4: ppid
        if marker in cmdline:
            matched.add(pid)
    found = set(matched)
    for pid in parents:  # walk each process up to see whether a matched one is an ancestor
        seen, node = [], pid
        while node in parents and node not in found and node not in seen:
            seen.append(node)
            node = parents[node]
        if node in found:
            found.update(seen)
    return sorted(found)


def stop_head(temp_dir: str) -> None:
    """Stop this head node's processes only (``ray stop`` would stop every Ray here)."""
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        for pid in pids_using(temp_dir):
            with contextlib.suppress(ProcessLookupError):  # it may end by itself
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while pids_using(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not pids_using(temp_dir):
            return


@pytest.fixture()
def ray_head():
    """A Ray head node of our own: (dashboard URL, environment for the ray CLI)."""
    temp_dir = tempfile.mkdtemp(prefix="dssn-head-", dir="/tmp")  # short: socket paths
    dashboard = free_port()
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    # RAY_API_SERVER_ADDRESS: the State API of this head for every process it starts (see
    # dssn.tune.tuner.start_local_ray); RAY_AUTH_MODE=token: token auth, as on a cluster
    env.update(RAY_AUTH_MODE="token", RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{dashboard}")
    ports = {
        "--port": free_port(), "--dashboard-port": dashboard,
        "--ray-client-server-port": free_port(), "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(), "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(), "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
    }  # fmt: skip
    cmd = [str(BIN / "ray"), "start", "--head", f"--num-cpus={HEAD_CPUS}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}",
           "--disable-usage-stats", *(f"{k}={v}" for k, v in ports.items())]  # fmt: skip
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stderr[-3000:]
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        stop_head(temp_dir)
    assert not pids_using(temp_dir), "processes of the test's head node survived"
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.ray
def test_job_submit_of_the_digits_smoke_search(ray_head, tmp_path):
    address, env = ray_head
    # Ray 2.60: the head runs with token auth, and the CLI sends the token only when told to
    no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    listing = subprocess.run(
        [str(BIN / "ray"), "job", "list", "--address", address],
        env=no_token, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert listing.returncode != 0
    assert "authentication token" in (listing.stdout + listing.stderr).lower()

    storage = tmp_path / "runs"
    job = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--",
         str(BIN / "python"), str(ROOT / "experiments" / "tune_digits.py"), "--smoke-test",
         "--storage", str(storage)],
        env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, cwd=ROOT,
    )  # fmt: skip
    log = job.stdout + job.stderr
    assert job.returncode == 0, log[-5000:]
    assert "succeeded" in log
    table = pd.read_csv(storage / "digits-smoke" / "results" / "trials.csv")
    assert len(table) == 2
    assert table["status"].eq("TERMINATED").all()
    assert table["best_teacher_miou"].notna().all()
    assert (storage / "digits-smoke" / "results" / "best_config.yaml").is_file()

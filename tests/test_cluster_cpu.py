"""benchmarks/cluster_cpu.py: the per-process CPU meter the data and scaling benchmarks share,
and scaling.py's kinds of process."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # scaling.py imports cluster_cpu by name, as a script would
    spec.loader.exec_module(module)
    return module


cluster_cpu = load("cluster_cpu")
scaling = load("scaling")


def meter_with(readings: list[tuple[float, dict]]):
    meter = cluster_cpu.ClusterCPU(history=True)
    meter.history = readings
    return meter


def test_cores_between_counts_each_kind_over_the_window_by_its_latest_name():
    a, b, c, d = (1, 0.0), (2, 0.0), (3, 0.0), (4, 0.0)
    meter = meter_with(
        [
            (100.0, {a: (5.0, "ray::IDLE"), b: (1.0, "raylet")}),  # before the window
            (110.0, {a: (6.0, "ray::IDLE"), b: (2.0, "raylet"), c: (0.5, "ray::IDLE")}),
            # a becomes a train worker; d starts inside the window; c exits after this one
            (115.0, {a: (9.0, "ray::RayTrainWorker"), b: (2.5, "raylet"), c: (1.5, "ray::IDLE"),
                     d: (0.5, "ray::MapBatches(read_and_augment)")}),
            (120.0, {a: (12.0, "ray::RayTrainWorker"), b: (3.0, "raylet"),
                     d: (2.5, "ray::IDLE")}),
            (130.0, {a: (30.0, "ray::RayTrainWorker"), b: (9.0, "raylet"),
                     d: (9.0, "ray::IDLE")}),  # after the window
        ]
    )  # fmt: skip
    cores, window = meter.cores_between(109.6, 120.4, scaling.process_kind)
    assert window == 10.0
    assert cores["train workers"] == pytest.approx(0.6)  # (12 - 6) / 10, named as at the end
    assert cores["Ray daemons"] == pytest.approx(0.1)
    assert cores["data tasks"] == pytest.approx(0.35)  # c: 1.0 until it exits, d: 2.5 from 0
    assert set(cores) == {"train workers", "Ray daemons", "data tasks"}
    assert meter.started_between(109.6, 120.4) == 1  # d; c was there at the window's start
    assert meter.started_between(99.0, 131.0) == 2  # c and d


def test_cores_between_refuses_a_window_without_two_readings():
    meter = meter_with([(100.0, {}), (101.0, {}), (102.0, {})])
    with pytest.raises(ValueError, match="fewer than two readings"):
        meter.cores_between(150.0, 160.0, scaling.process_kind)
    with pytest.raises(ValueError, match="history=True"):
        cluster_cpu.ClusterCPU().cores_between(0.0, 1.0, scaling.process_kind)


@pytest.mark.parametrize(
    "name, kind",
    [
        ("driver", "driver"),
        ("ray::RayTrainWorker", "train workers"),
        ("ray::RayTrainWorker.run_train_fn", "train workers"),
        ("ray::SplitCoordinator.get", "data coordinators"),
        ("ray::IDLE", "data tasks"),
        ("ray::MapBatches(read_and_augment)", "data tasks"),
        ("ray::ReadParquet->SplitBlocks(2)", "data tasks"),
        ("ray::_StatsActor", "Ray actors and agents"),
        ("ray::TrainController.run", "Ray actors and agents"),
        ("ray::DashboardAgent", "Ray actors and agents"),
        ("/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet", "Ray daemons"),
        ("gcs_server", "Ray daemons"),
    ],
)
def test_scaling_sorts_processes_by_name(name, kind):
    assert scaling.process_kind(name) == kind


def test_the_live_meter_reads_this_process_as_the_driver():
    with cluster_cpu.ClusterCPU(interval=0.05, history=True) as meter:
        start = time.time()
        end = start + 0.3
        while time.time() < end:
            sum(i * i for i in range(1000))  # busy: this process uses CPU
    cores, window = meter.cores_between(start, end, scaling.process_kind)
    assert window > 0.1
    assert 0.3 < cores["driver"] <= 1.5


def test_cores_table_sums_the_kinds_and_marks_a_run_it_could_not_measure(monkeypatch):
    monkeypatch.setattr(scaling.os, "cpu_count", lambda: 2)
    rows = [
        {
            "workers": 1,
            "window_s": 17.2,
            "cores": {"train workers": 0.9, "data tasks": 0.25},
            "started": 2,
        },
        {"workers": 2, "window_s": 0.0, "cores": None},  # joined a cluster: not this meter's
    ]
    lines = scaling.cores_table(rows).splitlines()
    assert lines[0].startswith("| workers | window (s) | train workers | data tasks |")
    assert lines[2] == "| 1 | 17 | 0.90 | 0.25 | 0.00 | 0.00 | 0.00 | 0.00 | 1.15 | 0.85 | 2 |"
    assert lines[3].startswith("| 2 | (not measured")

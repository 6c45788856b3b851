"""A real search on tiny digits: TorchTrainer trials through OptunaSearch + ASHA, interrupted
and resumed, then its table and plots; and the printed space against what trials received.

One search serves every check (each TorchTrainer start costs ~15-20 s here): 4 trials of 2
epochs (8 steps each, tiny backbone, 32 px), 2 at a time. The space adds a learning rate chosen
from a useless 1e-6 and a working 0.05, and the seeded sampler draws 0.05, 0.05, 1e-6, 1e-6: the
third trial starts only when one of the first two has finished, so ASHA has a working trial's
epoch-1 mIoU to stop it by. The search is interrupted (SIGUSR1, what Tune treats like Ctrl-C)
once three trials have ended (the fourth is then running) and resumed with
``dssn tune --resume``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import yaml
from ray import tune

from dssn.cli import main
from dssn.config import load_config
from dssn.data.format import read_dataset_info
from dssn.tune.results import load_experiment, trial_table
from dssn.tune.space import format_space
from dssn.tune.tuner import experiment_path, run_search

pytestmark = pytest.mark.ray

SAMPLES = 4
EPOCHS = 2
INTERRUPT_AFTER = 3  # ended trials
SEED = 4  # TPE's first draws of the lr choice: see test_the_sampler_draws_good_lrs_first
LR_DRAWS = [0.05, 0.05, 1e-6, 1e-6]
PG_CLEANUP_S = 60


def write_config(path: Path, shards: Path, storage: Path) -> Path:
    classes = len(read_dataset_info(shards)["classes"])
    data = {
        "name": "tiny",
        "model": {"backbone": "tiny", "width": 8, "num_classes": classes},
        # the teacher must move within 4 steps for its mIoU to tell trials apart
        "dssn": {"ema": 0.5},
        "data": {"root": str(shards), "crop_size": 32, "batch_size": 2},
        "train": {
            "epochs": EPOCHS,
            "iters_per_epoch": 8,
            "log_every": 1,
            "cpus_per_worker": 0.5,
            "threads_per_worker": 1,
            "storage": str(storage),
        },
        "tune": {
            "num_samples": SAMPLES,
            "max_concurrent_trials": 2,
            "seed": SEED,
            "extra": ["lr"],
            # a clearly bad and a good learning rate: ASHA has something to stop
            "space": {"lr": {"choice": [1e-6, 0.05]}},
        },
    }
    path.write_text(yaml.safe_dump(data))
    return path


class InterruptAfter(tune.Callback):
    """SIGUSR1 to this process once ``n`` trials finished (once: a marker file keeps the
    resumed search, which restores this callback from the experiment, from stopping again)."""

    def __init__(self, n: int, marker: Path):
        self.n, self.marker, self.finished = n, marker, 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finished += 1
        if self.finished >= self.n and not self.marker.exists():
            self.marker.write_text("interrupted")
            os.kill(os.getpid(), signal.SIGUSR1)


def trial_state(path: str) -> dict[str, tuple[str, int]]:
    """{trial id: (status, reported results)} from the experiment directory."""
    exp = load_experiment(path)
    return {t.trial_id: (t.status, len(t.history)) for t in exp.trials}


@pytest.fixture(scope="module")
def search(ray_instance, tiny_digits, tmp_path_factory):
    import ray

    tmp = tmp_path_factory.mktemp("search")
    config = write_config(tmp / "tiny.yaml", tiny_digits, tmp / "runs")
    cfg = load_config(config)
    pgs_before = set(ray.util.placement_group_table())
    run_search(cfg, callbacks=[InterruptAfter(INTERRUPT_AFTER, tmp / "interrupted")])
    path = experiment_path(cfg)
    first = trial_state(path)
    result_files = {
        t: (Path(path) / f"trial_{t}" / "result.json").read_bytes()
        for t, (status, _) in first.items()
        if status == "TERMINATED"
    }
    code = main(["tune", "--config", str(config), "--resume"])
    # Ray Train's cleaner polls every second (slower on a loaded machine): give it time
    deadline = time.monotonic() + PG_CLEANUP_S
    while True:
        pgs = ray.util.placement_group_table()
        new_pgs = {k: v["state"] for k, v in pgs.items() if k not in pgs_before}
        if set(new_pgs.values()) <= {"REMOVED"} or time.monotonic() > deadline:
            break
        time.sleep(1)
    return cfg, config, path, first, result_files, code, new_pgs


def test_the_sampler_draws_good_lrs_first(tiny_digits, tmp_path):
    """The premise of the ASHA check: the seeded sampler's first four learning rates."""
    from dssn.tune.space import build_space, to_tune
    from dssn.tune.tuner import build_searcher

    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_digits, tmp_path))
    searcher = build_searcher(cfg)
    searcher.set_search_properties("teacher_miou", "max", to_tune(build_space(cfg)))
    assert [searcher.suggest(f"t{i}")["lr"] for i in range(SAMPLES)] == LR_DRAWS


def test_interrupted_search_resumes_without_rerunning_finished_trials(search):
    cfg, _, path, first, result_files, code, _ = search
    assert code == 0
    finished = [t for t, (status, _) in first.items() if status == "TERMINATED"]
    assert len(finished) >= INTERRUPT_AFTER
    assert len(finished) < SAMPLES  # it really was interrupted
    final = trial_state(path)
    assert len(final) == SAMPLES
    assert all(status == "TERMINATED" for status, _ in final.values())
    for trial, before in result_files.items():  # finished trials: not one more result
        assert (Path(path) / f"trial_{trial}" / "result.json").read_bytes() == before


def test_asha_stopped_a_trial_and_the_table_and_plots_exist(search):
    _, _, path, *_ = search
    table = trial_table(load_experiment(path))
    assert len(table) == SAMPLES
    assert table["stopped_early"].sum() >= 1
    assert (table.loc[table["stopped_early"], "epochs"] < EPOCHS).all()
    assert (table.loc[~table["stopped_early"], "epochs"] == EPOCHS).all()
    results = Path(path) / "results"
    for name in ("trials.csv", "trials.parquet", "trials.md", "best_config.yaml"):
        assert (results / name).is_file(), name
    for name in ("curves.png", "params.png", "importance.png"):
        assert (results / name).read_bytes()[:4] == b"\x89PNG", name


def test_stopped_trials_release_their_workers(search):
    *_, new_pgs = search
    # every placement group of the search (Tune's and Train's) is gone, ASHA-stopped trials
    # included: Ray Train's cleaner found our controller dead through our own State API
    assert new_pgs and set(new_pgs.values()) == {"REMOVED"}, new_pgs


def test_printed_space_is_what_the_trials_received(search):
    cfg, _, path, *_ = search
    printed = format_space(cfg)
    ranges = dict(
        (m.group(1), m.group(2))
        for m in re.finditer(r"^  (\w+)\s+[\w.]+\s+(\S+ .+)$", printed, re.MULTILINE)
        if "=" not in m.group(0)
    )
    fixed = dict(re.findall(r"^  ([\w.]+) = (\S+)", printed, re.MULTILINE))
    assert set(ranges) == {"temperature", "topk_ratio", "w_strong", "w_fp", "w_consistency", "lr"}
    assert fixed == {"dssn.selection": "topk", "dssn.consistency": "infonce", "train.epochs": "2"}
    for trial_dir in Path(path).glob("trial_*"):
        params = json.loads((trial_dir / "params.json").read_text())
        assert set(params) == set(ranges)
        for name, value in params.items():
            assert within(value, ranges[name]), (name, value, ranges[name])
        trained = load_config(trial_dir / "train" / "config.yaml")  # what the workers ran
        assert trained.dssn.selection == "topk" and trained.dssn.consistency == "infonce"
        assert trained.train.epochs == EPOCHS
        assert trained.dssn.temperature == pytest.approx(params["temperature"])
        assert trained.optim.lr == pytest.approx(params["lr"])


def within(value, described: str) -> bool:
    kind, rest = described.split(" ", 1)
    if kind == "choice":
        return str(value) in [v.strip() for v in rest.strip("{}").split(",")]
    low, high = (float(v) for v in rest.strip("[]").split(","))
    return low * (1 - 1e-9) <= value <= high * (1 + 1e-9)

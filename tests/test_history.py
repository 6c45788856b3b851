"""A run's per-epoch history: the records, their trip through a checkpoint, ``history.csv``,
``curves.png`` and ``dssn compare``'s ``compare.png`` (no Ray; the Ray run's history across a
restart is checked in test_train_ray.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from dssn.cli import main
from dssn.config import Config
from dssn.train import history
from dssn.train.setup import build_networks
from dssn.train.state import TrainState, gather_rng, restore_run, save_run

TRAIN = {  # what train_one_epoch returns (a subset)
    "loss": 1.5,
    "loss_x": 0.9,
    "loss_s1": 0.4,
    "loss_s2": 0.5,
    "loss_fa": 0.3,
    "loss_fb": 0.3,
    "loss_img": 0.02,
    "loss_feat": 0.01,
    "mask_ratio": 0.6,
    "lr": 0.01,
    "images_per_s": 80.0,
    "data_wait": 0.03,
    "steady_start_unix": 1.7e9,
    "epoch_end_unix": 1.7e9 + 10,
}


def fake_history(epochs: int = 4, restart_at: int = 3) -> list[dict]:
    """Epochs 1..epochs, evaluated every other epoch, resumed before ``restart_at``."""
    out = []
    state = TrainState()
    for epoch in range(1, epochs + 1):
        state.epoch, state.iteration = epoch, 10 * epoch
        state.restarts = int(epoch >= restart_at)
        evaluated = epoch % 2 == 0
        if evaluated:
            state.teacher_miou, state.student_miou = 0.1 * epoch, 0.08 * epoch
        train = {**TRAIN, "loss": TRAIN["loss"] / epoch}
        out.append(history.epoch_record(state, train, evaluated))
    return out


def test_epoch_record_keeps_the_epoch_and_leaves_out_clock_stamps():
    records = fake_history()
    first, second = records[0], records[1]
    assert first["epoch"] == 1 and first["iteration"] == 10 and first["evaluated"] is False
    # an epoch without evaluation has no mIoU of its own (not the last evaluation's)
    assert first["teacher_miou"] is None and first["student_miou"] is None
    assert second["teacher_miou"] == pytest.approx(0.2) and second["student_miou"] > 0
    assert first["loss_x"] == 0.9 and first["images_per_s"] == 80.0 and first["lr"] == 0.01
    assert "steady_start_unix" not in first and "epoch_end_unix" not in first
    assert [r["restarts"] for r in records] == [0, 0, 1, 1]


def test_csv_round_trip_and_column_order(tmp_path):
    records = fake_history()
    path = history.write_csv(records, tmp_path / "history.csv")
    header = path.read_text().splitlines()[0].split(",")
    assert header[:6] == list(history.FIRST)
    back = history.read_csv(path)
    assert len(back) == 4
    assert back[0]["teacher_miou"] is None and back[1]["teacher_miou"] == pytest.approx(0.2)
    assert back[2]["evaluated"] is False and back[3]["evaluated"] is True
    assert back[3]["loss"] == pytest.approx(1.5 / 4) and back[3]["iteration"] == 40


def test_write_history_makes_the_csv_and_a_four_panel_png(tmp_path):
    paths = history.write_history(fake_history(), tmp_path, "run (method dssn)")
    assert [p.name for p in paths] == [history.HISTORY_CSV, history.CURVES_PNG]
    with Image.open(paths[1]) as png:
        width, height = png.size
        pixels = png.convert("RGB").getcolors(maxcolors=1 << 20)
    assert width == round((4 * history.PANEL[0] + 0.6) * history.DPI)
    assert height == round(history.PANEL[1] * history.DPI)
    assert len(pixels) > 50  # lines and text drawn, not a blank canvas
    assert history.write_history([], tmp_path / "none", "empty") == []


def test_resumes_are_marked_and_nan_points_skipped():
    plt = history.pyplot()
    fig, ax = plt.subplots()
    records = fake_history(epochs=5, restart_at=3)
    history._restarts(ax, records)
    marks = [line.get_xdata()[0] for line in ax.get_lines()]
    assert marks == [2.5]  # one dotted line, before epoch 3 (the first of the resumed attempt)
    records[1]["teacher_miou"] = math.nan
    xs, ys = history._series(records, ("teacher_miou",))
    assert xs == [4] and ys == [pytest.approx(0.4)]
    xs, ys = history._series(records, ("loss_s1", "loss_s2"))
    assert xs == [1, 2, 3, 4, 5] and ys[0] == pytest.approx(0.45)
    plt.close(fig)


def test_history_travels_in_the_checkpoint(tmp_path):
    cfg = Config()
    cfg.model.backbone, cfg.model.width, cfg.model.num_classes = "tiny", 8, 3
    nets = build_networks(cfg, torch.device("cpu"), world_size=1)
    state = TrainState(epoch=4, iteration=40, history=fake_history())
    save_run(tmp_path, nets, state, cfg, gather_rng(1))
    assert json.loads((tmp_path / "state.json").read_text())["history"][1]["epoch"] == 2
    restored = restore_run(tmp_path, build_networks(cfg, torch.device("cpu"), 1), cfg, 0, 1)
    assert restored.history == state.history


def test_compare_plots_the_runs_that_have_a_history(tmp_path, capsys):
    from test_compare import fake_run

    root = tmp_path / "shards"
    root.mkdir()
    a = fake_run(tmp_path, "dssn", [0.9, 0.5, 0.4], root)
    b = fake_run(tmp_path, "old", [0.8, 0.3, 0.2], root)
    history.write_csv(fake_history(), a / history.HISTORY_CSV)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"no {history.HISTORY_CSV} in old" in printed
    with Image.open(out / history.COMPARE_PNG) as png:
        assert png.size[0] > png.size[1]

"""The epoch loop without Ray: synthetic batches through the real step, optimizer and EMA.

Checks what the Ray runs cannot see cheaply: the NaN policies (error names the step and writes
nothing; skip leaves the weights untouched and counts), poly decay, EMA updates, the metrics.
"""

from __future__ import annotations

import logging
import time

import pytest
import torch

from dssn.config import Config
from dssn.train import loop
from dssn.train.faults import FaultInjector
from dssn.train.setup import build_networks
from dssn.train.state import TrainState

SIZE = 32
BATCH = 2
CLASSES = 3


def tiny_cfg(**train) -> Config:
    cfg = Config()
    cfg.model.backbone, cfg.model.width, cfg.model.num_classes = "tiny", 8, CLASSES
    cfg.data.crop_size, cfg.data.batch_size = SIZE, BATCH
    cfg.train.epochs, cfg.train.iters_per_epoch, cfg.train.log_every = 2, 3, 2
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def fake_batches(cfg: Config, epoch: int):
    """What iter_train_batches yields: uint8 images, uint8 masks / ignore / boxes."""
    gen = torch.Generator().manual_seed(epoch)

    def images():
        return torch.randint(0, 256, (BATCH, 3, SIZE, SIZE), generator=gen, dtype=torch.uint8)

    for _ in range(cfg.train.iters_per_epoch):
        if cfg.labeled_only(epoch):  # supervised / burn-in: the labeled stream alone
            yield {
                "image_x": images(),
                "mask_x": torch.randint(0, CLASSES, (BATCH, SIZE, SIZE), generator=gen).byte(),
            }
            continue
        box = torch.zeros(BATCH, SIZE, SIZE, dtype=torch.uint8)
        box[:, 4:12, 4:12] = 1
        yield {
            "image_x": images(),
            "mask_x": torch.randint(0, CLASSES, (BATCH, SIZE, SIZE), generator=gen).byte(),
            **{k: images() for k in ("image_u_w", "image_u_s1", "image_u_s2")},
            **{k: images() for k in ("image_mix_w", "image_mix_s1", "image_mix_s2")},
            "ignore_u": torch.zeros(BATCH, SIZE, SIZE, dtype=torch.uint8),
            "ignore_mix": torch.zeros(BATCH, SIZE, SIZE, dtype=torch.uint8),
            "box_u1": box,
            "box_u2": torch.zeros_like(box),
        }


def to_device(raw, device, cfg):
    """The contract's conversion: images normalised float, masks long."""
    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    return {
        k: (v.float() / 255 - mean) / std if k.startswith("image") else v.long()
        for k, v in raw.items()
    }


@pytest.fixture
def run_epoch(monkeypatch):
    monkeypatch.setattr(loop, "iter_train_batches", fake_batches)
    monkeypatch.setattr(loop, "to_device", to_device)

    def run(cfg: Config, state: TrainState, epoch: int = 0):
        nets = build_networks(cfg, torch.device("cpu"), world_size=1)
        total = cfg.train.epochs * cfg.train.iters_per_epoch
        faults = FaultInjector(cfg, rank=0, world_size=1)
        out = loop.train_one_epoch(
            cfg, nets, state, epoch, total, faults, torch.device("cpu"), rank=0, world_size=1
        )
        return nets, out

    return run


def test_epoch_trains_logs_and_decays(run_epoch, capsys):
    cfg = tiny_cfg()
    state = TrainState()
    nets, out = run_epoch(cfg, state)
    assert state.iteration == 3 and out["steps"] == 3
    assert nets.ema.updates == 3
    for key in ("loss", "loss_x", "loss_s1", "mask_ratio", "images_per_s", "data_wait"):
        assert key in out and out[key] == out[key]  # present and not NaN
    assert 0.0 <= out["data_wait"] < 1.0
    # poly decay after the 3rd step (index 2) of 6: lr * (1 - 2/6)^0.9
    assert out["lr"] == pytest.approx(cfg.optim.lr * (1 - 2 / 6) ** 0.9)
    log = capsys.readouterr().out
    assert "epoch 1/2 step 2/3 (iter 2)" in log and "mask_ratio" in log and "img/s" in log
    line = next(x for x in log.splitlines() if "step 2/3" in x)
    assert " eta " in line  # the run's 4 remaining steps at the window's pace
    # the epoch's last step gets a line too (3 is not a multiple of log_every 2), and only one
    steps = [x.split(" (iter")[0] for x in log.splitlines() if " step " in x]
    assert steps == ["epoch 1/2 step 2/3", "epoch 1/2 step 3/3"]


def test_an_epoch_shorter_than_log_every_still_logs_its_end(run_epoch, capsys, monkeypatch):
    from dssn.train.board import Board

    cfg = tiny_cfg(log_every=100)  # 3 steps an epoch, as the demo's 25 against 100
    seen = []
    monkeypatch.setattr(Board, "scalars", lambda self, group, _, step: seen.append((group, step)))
    real, real_remaining = loop.train_one_epoch, loop.remaining
    board = Board.__new__(Board)  # only scalars() is called, recorded above
    board.classes = None
    monkeypatch.setattr(loop, "train_one_epoch", lambda *a, **k: real(*a, **{**k, "board": board}))
    paced = []
    monkeypatch.setattr(loop, "remaining", lambda *a: paced.append(a[-1]) or real_remaining(*a))
    run_epoch(cfg, TrainState())
    lines = [x for x in capsys.readouterr().out.splitlines() if " step " in x]
    assert len(lines) == 1 and lines[0].startswith("epoch 1/2 step 3/3 (iter 3)")
    assert " eta " in lines[0] and paced == [3]  # the time left at the pace of those 3 steps
    assert seen == [("train", 3), ("pseudo", 3)]  # the board's points at the global iteration


def test_time_left_of_the_run_or_of_its_burn_in():
    cfg = tiny_cfg(epochs=4, log_every=10)  # 100 steps an epoch below
    assert loop.remaining(cfg, 3, 350, 100, 5.0, 10) == "eta 25s"  # 50 steps at 0.5 s
    assert loop.remaining(cfg, 3, 350, 100, 5.0, 5) == "eta 50s"  # a short window: 1 s a step
    cfg.dssn.burn_in_epochs = 2  # labeled-only steps now, DSSN steps later: only the burn-in
    assert loop.remaining(cfg, 1, 150, 100, 5.0, 10) == "burn-in ends in 25s"
    assert loop.remaining(cfg, 2, 250, 100, 20.0, 10) == "eta 5m00s"
    cfg.method = "supervised"  # every step labeled-only: the whole run
    assert loop.remaining(cfg, 0, 50, 100, 5.0, 10) == "eta 2m55s"


def test_ray_trains_report_lines_are_quiet_and_its_warnings_stay():
    from ray.train.v2._internal.execution import context

    logger = logging.getLogger(context.__file__)
    before = logger.level
    try:
        logger.setLevel(logging.INFO)  # as in a Ray worker, where the line shows
        loop.quiet_report_lines()
        assert not logger.isEnabledFor(logging.INFO)  # "Reporting training result N: ..."
        assert logger.isEnabledFor(logging.WARNING)
    finally:
        logger.setLevel(before)


def test_eta_reads_as_hours_minutes_or_seconds():
    assert loop.format_eta(45.4) == "45s"
    assert loop.format_eta(750) == "12m30s"
    assert loop.format_eta(3900) == "1h05m"
    assert loop.format_eta(-3) == "0s"


def test_epoch_trains_on_given_batches_without_the_streams(monkeypatch):
    """``batches`` (in-memory ones, as benchmarks/ddp_cpu.py passes) replaces the Ray Data
    streams: they are not opened, and the epoch takes as many steps as it is given."""

    def no_streams(cfg, epoch):
        raise AssertionError("the Ray Data streams were opened")

    monkeypatch.setattr(loop, "iter_train_batches", no_streams)
    monkeypatch.setattr(loop, "to_device", to_device)
    cfg = tiny_cfg()
    nets = build_networks(cfg, torch.device("cpu"), world_size=1)
    state = TrainState()
    before = time.time()
    out = loop.train_one_epoch(
        cfg, nets, state, 0, 6, FaultInjector(cfg, 0, 1), torch.device("cpu"), 0, 1,
        batches=list(fake_batches(cfg, 0))[:2],
    )  # fmt: skip
    assert out["steps"] == state.iteration == nets.ema.updates == 2
    assert out["images_per_s"] > 0 and out["loss"] == out["loss"]
    # the steady part's wall-clock window (benchmarks/scaling.py reads CPU counters over it)
    assert before <= out["steady_start_unix"] < out["epoch_end_unix"] <= time.time()


def one_step_delta(cfg: Config, batches: list, monkeypatch) -> tuple[list, object, dict]:
    """The student's weight change over the given batches (one step's worth), from the
    initial weights every ``build_networks(cfg)`` starts from."""
    monkeypatch.setattr(loop, "to_device", to_device)
    cpu = torch.device("cpu")
    nets = build_networks(cfg, cpu, world_size=1)
    before = [p.detach().clone() for p in nets.module.parameters()]
    state = TrainState()
    out = loop.train_one_epoch(
        cfg, nets, state, 0, 2, FaultInjector(cfg, 0, 1), cpu, 0, 1, batches=batches
    )
    assert state.iteration == 1 and out["steps"] == 1 and nets.ema.updates == 1
    return (
        [p.detach() - b for p, b in zip(nets.module.parameters(), before, strict=True)],
        nets,
        out,
    )


def test_accumulated_micro_batches_make_one_step_of_their_mean_gradient(monkeypatch):
    """``train.accumulate=2``: one SGD step (and one EMA update) on the mean of the two
    micro-batches' gradients. SGD's first step is linear in the gradient, so its change is the
    mean of the changes one step on each micro-batch alone makes (dropout off: the step is then
    deterministic)."""
    cfg = tiny_cfg(iters_per_epoch=1)
    cfg.model.dropout = 0.0
    first, second = list(fake_batches(tiny_cfg(iters_per_epoch=2), 0))
    alone = [one_step_delta(cfg, [b], monkeypatch)[0] for b in (first, second)]
    cfg.train.accumulate = 2
    together, _, out = one_step_delta(cfg, [first, second], monkeypatch)
    moved = 0
    for both, a, b in zip(together, *alone, strict=True):
        torch.testing.assert_close(both, (a + b) / 2, rtol=1e-4, atol=1e-7)
        moved += bool(both.abs().sum() > 0)
    assert moved > 10
    assert out["images_per_s"] > 0 and out["loss"] == out["loss"]


def test_a_part_filled_accumulation_is_not_stepped(monkeypatch):
    """Three batches with ``train.accumulate=2``: one step, and the third batch is dropped."""
    cfg = tiny_cfg(iters_per_epoch=1, accumulate=2)
    batches = list(fake_batches(tiny_cfg(iters_per_epoch=3), 0))
    _, nets, out = one_step_delta(cfg, batches, monkeypatch)
    assert nets.ema.updates == 1 and out["steps"] == 1


def test_burn_in_epochs_train_on_labeled_batches_then_dssn(run_epoch):
    cfg = tiny_cfg()
    cfg.dssn.burn_in_epochs = 1
    state = TrainState()
    nets, out = run_epoch(cfg, state, epoch=0)
    assert set(out) & {"loss_x", "loss_s1", "mask_ratio"} == {"loss_x"}
    assert out["loss"] == pytest.approx(out["loss_x"])  # the labeled loss alone, unhalved
    assert nets.ema.updates == 3  # the teacher follows the student during the burn-in
    assert out["images_per_s"] > 0 and out["steps"] == 3
    _, out = run_epoch(cfg, state, epoch=1)
    assert {"loss_x", "loss_s1", "loss_fa", "mask_ratio"} <= set(out)
    assert out["loss"] != pytest.approx(out["loss_x"])  # the unlabeled terms are back


def test_nan_error_names_the_step(run_epoch):
    cfg = tiny_cfg(nan_at_iter=1)
    state = TrainState(epoch=0)
    with pytest.raises(loop.NonFiniteLossError) as err:
        run_epoch(cfg, state)
    msg = str(err.value)
    assert "epoch 1/2, step 2/3 of the epoch (global iteration 1)" in msg
    assert "last good checkpoint (epoch 0) is unchanged" in msg


def test_nan_skip_leaves_weights_and_counts(monkeypatch):
    monkeypatch.setattr(loop, "iter_train_batches", fake_batches)
    monkeypatch.setattr(loop, "to_device", to_device)
    cfg = tiny_cfg(nan_at_iter=0, nan_policy="skip", iters_per_epoch=1)
    nets = build_networks(cfg, torch.device("cpu"), world_size=1)
    before = {k: v.detach().clone() for k, v in nets.module.named_parameters()}
    state = TrainState()
    faults = FaultInjector(cfg, rank=0, world_size=1)
    out = loop.train_one_epoch(cfg, nets, state, 0, 2, faults, torch.device("cpu"), 0, 1)
    assert state.nan_skipped == 1 and state.iteration == 1 and nets.ema.updates == 0
    for name, param in nets.module.named_parameters():
        assert torch.equal(param.detach(), before[name]), name
    assert "loss" not in out  # no finite step to average


def fp16_scaler(scale: float) -> torch.amp.GradScaler:
    """An enabled GradScaler on the CPU: the loss scaling of ``train.amp=fp16`` (which applies
    on CUDA only), exercised on float32 gradients."""
    return torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1)


def test_fp16_overflow_skips_the_step_lowers_the_scale_and_counts(monkeypatch):
    monkeypatch.setattr(loop, "iter_train_batches", fake_batches)
    monkeypatch.setattr(loop, "to_device", to_device)
    cfg = tiny_cfg(iters_per_epoch=1)
    cpu = torch.device("cpu")
    nets = build_networks(cfg, cpu, world_size=1)
    nets.scaler = fp16_scaler(2.0**10)
    overflows = iter([True])  # the first backward's gradients overflow, later ones do not
    param = next(nets.module.parameters())
    param.register_hook(lambda g: g.fill_(float("inf")) if next(overflows, False) else g)
    before = {k: v.detach().clone() for k, v in nets.module.named_parameters()}
    state, faults = TrainState(), FaultInjector(cfg, rank=0, world_size=1)
    out = loop.train_one_epoch(cfg, nets, state, 0, 2, faults, cpu, 0, 1)
    assert state.overflow_skipped == 1 and state.nan_skipped == 0 and state.iteration == 1
    assert nets.ema.updates == 0 and "loss" not in out  # no step: the teacher did not move
    assert nets.scaler.get_scale() == 2.0**9  # lowered by the backoff factor
    for name, p in nets.module.named_parameters():
        assert torch.equal(p.detach(), before[name]), name
    loop.train_one_epoch(cfg, nets, state, 1, 2, faults, cpu, 0, 1)
    assert state.overflow_skipped == 1 and nets.ema.updates == 1
    assert nets.scaler.get_scale() == 2.0**10  # grown again after a good step
    assert not torch.equal(param.detach(), before[next(iter(before))])


def test_fp16_log_lines_show_the_loss_scale(monkeypatch, capsys):
    cfg = tiny_cfg(iters_per_epoch=2)  # log_every 2
    nets = build_networks(cfg, torch.device("cpu"), world_size=1)
    nets.scaler = fp16_scaler(2.0**5)
    monkeypatch.setattr(loop, "iter_train_batches", fake_batches)
    monkeypatch.setattr(loop, "to_device", to_device)
    faults = FaultInjector(cfg, rank=0, world_size=1)
    loop.train_one_epoch(cfg, nets, TrainState(), 0, 4, faults, torch.device("cpu"), 0, 1)
    line = capsys.readouterr().out
    assert "loss_scale 128 overflow_skipped 0" in line  # grown after each good step


def test_a_loss_scaled_step_equals_the_plain_one(monkeypatch):
    """The scaler unscales the gradients before the optimizer sees them."""
    monkeypatch.setattr(loop, "iter_train_batches", fake_batches)
    monkeypatch.setattr(loop, "to_device", to_device)
    cfg = tiny_cfg(iters_per_epoch=1)
    cpu, weights = torch.device("cpu"), []
    for scaler in (None, fp16_scaler(2.0**12)):
        nets = build_networks(cfg, cpu, world_size=1)
        assert not nets.scaler.is_enabled()  # train.amp: none
        if scaler is not None:
            nets.scaler = scaler
        torch.manual_seed(0)  # the same dropout draws
        faults = FaultInjector(cfg, rank=0, world_size=1)
        loop.train_one_epoch(cfg, nets, TrainState(), 0, 2, faults, cpu, 0, 1)
        weights.append([p.detach().clone() for p in nets.module.parameters()])
    moved = 0
    for plain, scaled in zip(*weights, strict=True):
        torch.testing.assert_close(scaled, plain, rtol=1e-5, atol=1e-6)
        moved += 1
    assert moved > 10


def test_the_loss_scale_goes_into_the_checkpoint_and_back(tmp_path):
    from dssn.train.state import gather_rng, restore_run, save_run

    cfg, cpu = tiny_cfg(), torch.device("cpu")
    nets = build_networks(cfg, cpu, world_size=1)
    nets.scaler = fp16_scaler(2.0**7)
    save_run(tmp_path, nets, TrainState(epoch=1, iteration=3), cfg, gather_rng(1))
    fresh = build_networks(cfg, cpu, world_size=1)
    fresh.scaler = fp16_scaler(2.0**16)
    state = restore_run(tmp_path, fresh, cfg, 0, 1)
    assert fresh.scaler.get_scale() == 2.0**7 and state.grad_scaler["scale"] == 2.0**7
    plain = build_networks(cfg, cpu, world_size=1)  # train.amp: none: nothing to restore
    restore_run(tmp_path, plain, cfg, 0, 1)
    assert not plain.scaler.is_enabled()


def board_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard shows for ``log_dir``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_log_lines_go_to_tensorboard_at_the_global_iteration(run_epoch, monkeypatch, tmp_path):
    from dssn.train.board import Board

    cfg = tiny_cfg(iters_per_epoch=4)  # log_every 2: at iterations 2 and 4
    board = Board(str(tmp_path))
    real = loop.train_one_epoch
    monkeypatch.setattr(loop, "train_one_epoch", lambda *a, **k: real(*a, **{**k, "board": board}))
    run_epoch(cfg, TrainState())
    board.close()
    scalars = board_scalars(tmp_path)
    for tag in ("train/loss", "train/loss_x", "train/mask_ratio", "train/lr", "train/data_wait"):
        assert [step for step, _ in scalars[tag]] == [2, 4], tag
    for c in range(3):  # per class (no dataset names here): kept share and share of labels
        assert [step for step, _ in scalars[f"pseudo/share/{c}"]] == [2, 4]
    assert sum(
        v for t, points in scalars.items() if "pseudo/share/" in t for _, v in points[:1]
    ) == pytest.approx(1.0)
    kept = [v for t, points in scalars.items() if "pseudo/kept/" in t for _, v in points]
    assert kept and all(0.0 <= v <= 1.0 for v in kept)
    assert not any(t.startswith("train/") and "pixels" in t for t in scalars)
    lr = [v for _, v in scalars["train/lr"]]
    assert lr[0] > lr[1] > 0  # poly decay, as the log line prints it
    assert all(v > 0 for _, v in scalars["train/images_per_s"])


def test_a_resumed_board_hides_what_the_interrupted_attempt_logged_after_its_checkpoint(
    tmp_path,
):
    from dssn.train.board import open_board

    cfg = tiny_cfg()
    cfg.train.storage, cfg.train.name = str(tmp_path), "run"
    first = open_board(cfg, rank=0, resumed_from=0)
    for step in range(1, 6):  # the checkpoint was at 3; the attempt died after logging 5
        first.scalars("train", {"loss": float(step)}, step)
    first.scalars("eval", {"teacher_miou": 0.5, "skipped": float("nan")}, 3)
    first.close()
    again = open_board(cfg, rank=0, resumed_from=3)
    for step in (4, 5, 6):
        again.scalars("train", {"loss": 10.0 * step}, step)
    again.close()
    scalars = board_scalars(tmp_path / "run" / "tensorboard")
    assert scalars["train/loss"] == [(1, 1), (2, 2), (3, 3), (4, 40), (5, 50), (6, 60)]
    assert scalars["eval/teacher_miou"] == [(3, 0.5)]  # the checkpoint's evaluation stays
    assert "eval/skipped" not in scalars  # not finite: not drawn
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    (config,) = acc.Tensors("config/text_summary")  # written once, by the fresh start
    assert "    name: dssn" in config.tensor_proto.string_val[0].decode()


def test_only_rank_0_with_local_storage_writes_a_board(tmp_path):
    from dssn.train.board import open_board

    cfg = tiny_cfg()
    cfg.train.storage = str(tmp_path)
    assert open_board(cfg, rank=1, resumed_from=0) is None
    cfg.train.tensorboard = False
    assert open_board(cfg, rank=0, resumed_from=0) is None
    cfg.train.tensorboard, cfg.train.storage = True, "s3://bucket/runs"
    assert open_board(cfg, rank=0, resumed_from=0) is None
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("mode", ["original", "center_crop"])
def test_prediction_pictures_show_image_truth_and_prediction_side_by_side(mode):
    import numpy as np

    from dssn.model import build_model
    from dssn.train.board import IGNORE_COLOUR, prediction_pictures
    from dssn.train.evaluate import normalize, segment

    cfg = tiny_cfg()
    cfg.data.eval_mode, cfg.data.eval_crop = mode, 16
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    gen = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, 20, 24), generator=gen, dtype=torch.uint8)
    mask = torch.randint(0, CLASSES, (20, 24), generator=gen, dtype=torch.uint8)
    mask[10, :] = 255  # an ignored row, inside the central crop too
    palette = np.array([[10, 20, 30], [40, 50, 60], [70, 80, 90]], np.uint8)
    (picture,) = prediction_pictures(model, [(image, mask)], cfg, torch.device("cpu"), palette)
    assert model.training  # back in the mode it was in
    h, w = (16, 16) if mode == "center_crop" else (20, 24)
    top, left = (20 - h) // 2, (24 - w) // 2
    assert picture.shape == (h, 3 * w, 3) and picture.dtype == np.uint8
    shown, truth, predicted = picture[:, :w], picture[:, w : 2 * w], picture[:, 2 * w :]
    assert np.array_equal(shown, image[:, top : top + h, left : left + w].permute(1, 2, 0).numpy())
    cropped = mask[top : top + h, left : left + w].numpy()
    assert np.array_equal(
        truth[cropped == 255], np.full(((cropped == 255).sum(), 3), IGNORE_COLOUR)
    )
    assert np.array_equal(truth[cropped != 255], palette[cropped[cropped != 255]])
    with torch.no_grad():
        pred, _ = segment(model.eval(), normalize(image, cfg, torch.device("cpu")), mode, 16, 2 / 3)
    assert np.array_equal(predicted, palette[pred[0].numpy()])


def test_large_prediction_pictures_are_subsampled(monkeypatch):
    import numpy as np

    from dssn.model import build_model
    from dssn.train import board

    monkeypatch.setattr(board, "PREVIEW_SIDE", 12)  # a 20 x 24 image: every 2nd pixel
    cfg = tiny_cfg()
    model = build_model(cfg.model)
    image = torch.arange(3 * 20 * 24, dtype=torch.int32).remainder(256).byte().view(3, 20, 24)
    mask = torch.zeros(20, 24, dtype=torch.uint8)
    palette = np.zeros((CLASSES, 3), np.uint8)
    (picture,) = board.prediction_pictures(
        model, [(image, mask)], cfg, torch.device("cpu"), palette
    )
    assert picture.shape == (10, 36, 3)
    assert np.array_equal(picture[:, :12], image[:, ::2, ::2].permute(1, 2, 0).numpy())

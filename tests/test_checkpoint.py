"""The checkpoint directory format: round trip without Ray, weights_only, clear mismatch errors."""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest
import torch

from dssn.config import Config
from dssn.model import build_model
from dssn.train import checkpoint as ckpt
from dssn.train.schedule import build_optimizer


def tiny_config(**model) -> Config:
    cfg = Config()
    cfg.model.backbone = "tiny"
    cfg.model.width = 8
    cfg.model.num_classes = 3
    for key, value in model.items():
        setattr(cfg.model, key, value)
    return cfg


def _save(tmp_path, cfg):
    student = build_model(cfg.model)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(1.0)  # distinguishable from the student
    opt = build_optimizer(student, cfg.optim)
    student(torch.randn(2, 3, 32, 32)).mean().backward()
    opt.step()  # momentum buffers in the optimizer state
    state = {"epoch": 3, "iteration": 30, "best_teacher_miou": 0.5, "config": cfg.to_dict()}
    ckpt.save_checkpoint(
        tmp_path / "ck", student=student, teacher=teacher, optimizer=opt, state=state,
        rng=[ckpt.capture_rng()],
    )  # fmt: skip
    return student, teacher, opt


def test_round_trip_with_weights_only(tmp_path):
    cfg = tiny_config()
    student, teacher, opt = _save(tmp_path, cfg)
    d = tmp_path / "ck"
    assert sorted(p.name for p in d.iterdir()) == [
        "model.pt", "optimizer.pt", "rng.pt", "state.json", "teacher.pt",
    ]  # fmt: skip
    for name in ("model.pt", "teacher.pt", "optimizer.pt", "rng.pt"):
        torch.load(d / name, weights_only=True)  # no pickle of arbitrary objects anywhere
    state = json.loads((d / "state.json").read_text())
    assert state["epoch"] == 3 and state["iteration"] == 30 and state["format_version"] == 1
    assert ckpt.read_config(d).model.backbone == "tiny"

    fresh_student, fresh_teacher = build_model(cfg.model), build_model(cfg.model)
    ckpt.load_model_weights(fresh_student, d, ckpt.MODEL)
    ckpt.load_model_weights(fresh_teacher, d, ckpt.TEACHER)
    for a, b in zip(
        fresh_student.state_dict().values(), student.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    for a, b in zip(
        fresh_teacher.state_dict().values(), teacher.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    opt2 = build_optimizer(fresh_student, cfg.optim)
    opt2.load_state_dict(ckpt.load_file(d / ckpt.OPTIMIZER))
    assert opt2.state_dict()["state"][0]["momentum_buffer"].shape == (
        opt.state_dict()["state"][0]["momentum_buffer"].shape
    )


def test_ddp_wrapper_is_unwrapped(tmp_path):
    cfg = tiny_config()
    model = build_model(cfg.model)

    class Wrapper(torch.nn.Module):  # what DDP looks like: the network under .module
        def __init__(self, m):
            super().__init__()
            self.module = m

    state = {"epoch": 0, "iteration": 0, "config": cfg.to_dict()}
    ckpt.save_checkpoint(
        tmp_path, student=Wrapper(model), teacher=model, optimizer=None, state=state
    )
    assert not any(k.startswith("module.") for k in torch.load(tmp_path / "model.pt"))


def test_another_architecture_is_a_clear_error(tmp_path):
    _save(tmp_path, tiny_config())
    other_cfg = tiny_config(num_classes=5, backbone="resnet18")
    other = build_model(other_cfg.model)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_model_weights(other, tmp_path / "ck", ckpt.MODEL, model_cfg=other_cfg)
    msg = str(err.value)
    assert "trained as backbone=tiny, num_classes=3" in msg
    assert "the model here is backbone=resnet18, num_classes=5" in msg
    assert "another architecture" in msg and "missing keys" in msg


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="not a dssn checkpoint directory"):
        ckpt.read_state(tmp_path)
    (tmp_path / "state.json").write_text('{"format_version": 99}')
    with pytest.raises(ckpt.CheckpointError, match="format 99"):
        ckpt.read_state(tmp_path)


def test_the_cli_names_a_bad_checkpoint_in_one_line(tmp_path, capsys):
    from dssn.cli import main

    missing = tmp_path / "no-such-checkpoint"
    for command in (
        ["eval", "--data", str(tmp_path)],
        ["predict", "--images", str(tmp_path), "--out", str(tmp_path / "o")],
    ):
        assert main([command[0], "--checkpoint", str(missing), *command[1:]]) == 2
        err = capsys.readouterr().err
        assert err == f"dssn: checkpoint error: checkpoint not found: {missing}\n"
    assert main(["eval", "--checkpoint", str(tmp_path), "--data", str(tmp_path)]) == 2
    assert "not a dssn checkpoint directory" in capsys.readouterr().err


def test_rng_round_trip():
    state = ckpt.capture_rng()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.restore_rng(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_a_run_directory_stands_for_its_last_complete_checkpoint(tmp_path):
    run = tmp_path / "run"
    for epoch, files in ((2, ("state.json", "model.pt")), (10, ("state.json", "model.pt")),
                         (11, ("state.json",))):  # fmt: skip
        directory = run / f"checkpoint_epoch_{epoch:04d}"
        directory.mkdir(parents=True)
        for name in files:
            (directory / name).write_text("{}")
    last = run / "checkpoint_epoch_0010"  # 11 is half-written (a killed attempt): no model.pt
    assert ckpt.resolve_checkpoint(run) == last
    assert ckpt.resolve_checkpoint(last) == last
    assert ckpt.resolve_checkpoint(tmp_path) == tmp_path  # neither: left for the reader to name
    assert ckpt.resolve_checkpoint(tmp_path / "best.pth") == tmp_path / "best.pth"


def test_eval_refuses_a_negative_count_of_worst_images(tmp_path, capsys):
    from dssn.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--checkpoint", str(tmp_path), "--data", str(tmp_path), "--worst", "-2"])
    assert exit_.value.code == 2
    assert "argument --worst: -2 is negative" in capsys.readouterr().err


def test_eval_names_its_default_folder_by_mode_and_test_time_augmentation(tmp_path, capsys):
    from dssn.cli import main
    from dssn.config import Config
    from dssn.train.cli import default_eval_dir

    cfg = Config()
    cfg.data.eval_mode = "sliding_window"
    assert default_eval_dir(str(tmp_path), cfg) == tmp_path / "eval-sliding_window"
    cfg.data.eval_scales, cfg.data.eval_flip = [0.75, 1.0, 1.25], True
    assert (
        default_eval_dir(str(tmp_path), cfg) == tmp_path / "eval-sliding_window-x0.75-1-1.25-flip"
    )
    assert default_eval_dir(str(tmp_path / "best.pth"), cfg) == (
        tmp_path / "best-eval-sliding_window-x0.75-1-1.25-flip"
    )
    with pytest.raises(SystemExit):
        main(["eval", "--checkpoint", str(tmp_path), "--data", str(tmp_path), "--scales", "0"])
    assert "argument --scales: 0 is not a positive scale" in capsys.readouterr().err


def test_a_flip_for_a_model_trained_without_mirrored_images_gets_a_note(capsys):
    import argparse

    from dssn.config import Config
    from dssn.train.cli import apply_tta

    args = argparse.Namespace(command="eval", scales=[1.0, 1.5], flip=True)
    cfg = Config()  # data.hflip_p 0.5: the model saw mirrored images
    apply_tta(cfg, args)
    assert cfg.data.eval_scales == [1.0, 1.5] and cfg.data.eval_flip
    assert capsys.readouterr().err == ""
    cfg.data.hflip_p = 0.0  # as the digits
    apply_tta(cfg, args)
    assert "dssn eval: note: --flip, but this model trained without mirrored" in (
        capsys.readouterr().err
    )
    cfg = Config()
    apply_tta(cfg, argparse.Namespace(command="predict", scales=None, flip=False))
    assert cfg.data.eval_scales == [1.0] and not cfg.data.eval_flip  # the config's own


def test_model_init_starts_student_and_teacher_from_a_trained_teacher(tmp_path):
    """``model.init``: the networks a run builds start from the checkpoint's teacher (a run
    directory: its last checkpoint), or a reference file's EMA teacher, else its student;
    the optimizer starts afresh."""
    from dssn.train.setup import build_networks

    cfg = tiny_config()
    student, teacher = build_model(cfg.model), build_model(cfg.model)  # two different inits
    state = {"epoch": 3, "iteration": 30, "config": cfg.to_dict()}
    ckpt.save_checkpoint(tmp_path / "run" / "checkpoint_epoch_0003", student=student,
                         teacher=teacher, optimizer=None, state=state)  # fmt: skip
    reference = {"model": {"module." + k: v for k, v in student.state_dict().items()}}
    torch.save(reference, tmp_path / "student-only.pth")
    torch.save({**reference, "model_ema": teacher.state_dict()}, tmp_path / "with-ema.pth")
    # model.init replaces every weight: the backbone file is not read (here, there is none)
    cfg.model.pretrained = str(tmp_path / "no-such-backbone.pth")
    for init, source in ((tmp_path / "run", teacher), (tmp_path / "with-ema.pth", teacher),
                         (tmp_path / "student-only.pth", student)):  # fmt: skip
        cfg.model.init = str(init)
        nets = build_networks(cfg, torch.device("cpu"), world_size=1)
        for net in (nets.module, nets.teacher):
            for key, value in source.state_dict().items():
                assert torch.equal(net.state_dict()[key], value), (init, key)
        assert not nets.optimizer.state  # no moments: a new run, not a resumed one
    cfg.model.init = str(tmp_path / "run")
    cfg.model.num_classes = 5
    with pytest.raises(ckpt.CheckpointError, match="num_classes=3.*num_classes=5"):
        build_networks(cfg, torch.device("cpu"), world_size=1)
    cfg.model.init = str(tmp_path / "student-only.pth")
    with pytest.raises(
        ckpt.CheckpointError, match="(?s)model.init: .*shape mismatches.*num_classes=5"
    ):
        build_networks(cfg, torch.device("cpu"), world_size=1)

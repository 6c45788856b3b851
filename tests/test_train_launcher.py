"""Driver-side helpers that need no Ray: run location, path resolution, CLI flags."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from dssn.config import Config
from dssn.train.cli import train_overrides
from dssn.train.launcher import (
    finished_run,
    latest_checkpoint_state,
    resolve_paths,
    run_dir,
    run_exists,
    save_config,
)

DIGITS_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"


def test_relative_paths_become_absolute_for_the_workers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = Config()
    cfg.data.root, cfg.train.storage, cfg.model.pretrained = "shards/x", "runs", "w/r18.pth"
    cfg.model.init = "runs/sup"
    out = resolve_paths(cfg)
    assert out.data.root == str(tmp_path / "shards/x") and out.model.init == str(
        tmp_path / "runs/sup"
    )
    assert out.train.storage == str(tmp_path / "runs")
    assert out.model.pretrained == str(tmp_path / "w/r18.pth")
    cfg.data.root, cfg.model.pretrained = "s3://bucket/shards", "imagenet"
    out = resolve_paths(cfg)
    assert out.data.root == "s3://bucket/shards" and out.model.pretrained == "imagenet"


def test_run_dir_name_and_saved_config(tmp_path):
    cfg = Config()
    cfg.train.storage = str(tmp_path)
    assert run_dir(cfg) == f"{tmp_path}/dssn"  # the experiment name when train.name is unset
    cfg.train.name = "mine"
    path = save_config(cfg)
    assert Path(path) == tmp_path / "mine" / "config.yaml"
    assert not run_exists(cfg)  # a config alone is no Ray Train run to continue
    (tmp_path / "mine" / "checkpoint_manager_snapshot.json").write_text("{}")
    assert run_exists(cfg)


def test_continuing_with_other_settings_keeps_the_earlier_config_and_names_the_keys(
    tmp_path, capsys
):
    import yaml

    cfg = Config()
    cfg.train.storage, cfg.train.name = str(tmp_path), "run"
    save_config(cfg)
    save_config(cfg)  # the same settings: nothing kept, nothing printed
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.yaml"]
    assert capsys.readouterr().out == ""
    cfg.train.epochs, cfg.optim.lr = cfg.train.epochs + 10, 0.5
    save_config(cfg)
    out = capsys.readouterr().out
    kept = [p for p in (tmp_path / "run").iterdir() if p.name.startswith("config-before-")]
    assert len(kept) == 1 and f"config.yaml (kept as {kept[0].name})" in out
    assert "starts again (it holds no checkpoint to continue from)" in out
    assert f"  train.epochs: {cfg.train.epochs - 10} -> {cfg.train.epochs}" in out
    assert "  optim.lr: " in out and "-> 0.5" in out
    assert len(out.strip().splitlines()) == 3  # the heading and the two keys
    assert yaml.safe_load(kept[0].read_text())["optim"]["lr"] != 0.5
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["optim"]["lr"] == 0.5
    # with a checkpoint (the one with the most epochs counts), the run continues from it
    for epoch in (2, 3):
        (tmp_path / "run" / f"checkpoint_{epoch}").mkdir()
        (tmp_path / "run" / f"checkpoint_{epoch}" / "state.json").write_text(
            json.dumps({"epoch": epoch})
        )
    (tmp_path / "run" / "checkpoint_9").mkdir()  # half-written by a killed attempt: no state
    cfg.optim.lr = 0.25
    save_config(cfg)
    out = capsys.readouterr().out
    assert f"{tmp_path}/run continues from its epoch-3 checkpoint with other settings" in out
    assert "  optim.lr: 0.5 -> 0.25" in out


def test_cli_flags_become_overrides_after_positional_ones():
    args = argparse.Namespace(
        overrides=["train.epochs=3"], workers=2, gpus_per_worker=None, cpus_per_worker=0.5,
        storage="/tmp/r", name=None,
    )  # fmt: skip
    assert train_overrides(args) == [
        "train.epochs=3", "train.workers=2", "train.cpus_per_worker=0.5", "train.storage=/tmp/r",
    ]  # fmt: skip


def test_local_ray_gives_ray_data_every_core_beside_the_workers(monkeypatch):
    """Ray Data's logical CPUs cap its concurrent tasks: one per core on top of the train
    workers' CPUs, so when the workers wait (an epoch's first batches) every core augments."""
    from dssn.train import launcher

    monkeypatch.setattr(launcher.os, "cpu_count", lambda: 2)
    cfg = Config()
    cfg.train.workers, cfg.train.cpus_per_worker = 2, 1
    assert launcher.local_cpus(cfg) == 4  # the rule before 2026-12-07 gave 3: one task at once
    cfg.train.workers, cfg.train.cpus_per_worker = 1, 0.5
    assert launcher.local_cpus(cfg) == 3
    monkeypatch.setattr(launcher.os, "cpu_count", lambda: None)  # unknown: still room for data
    assert launcher.local_cpus(cfg) - launcher.train_cpus(cfg) >= launcher.MIN_FREE_DATA_CPUS


def test_finished_run_is_the_checkpoint_with_every_epoch(tmp_path):
    cfg = Config()
    cfg.train.storage, cfg.train.name, cfg.train.epochs = str(tmp_path), "r", 2
    assert finished_run(cfg) is None  # no run at all
    run = tmp_path / "r"
    for epoch in (1, 2):
        d = run / f"checkpoint_epoch_{epoch:04d}"
        d.mkdir(parents=True)
        (d / "state.json").write_text(json.dumps({"epoch": epoch, "metrics": {"epoch": epoch}}))
    (run / "checkpoint_epoch_0003").mkdir()  # a killed attempt's half-written directory
    (run / "checkpoint_epoch_0003" / "model.pt").write_bytes(b"")
    directory, state = finished_run(cfg)
    assert Path(directory).name == "checkpoint_epoch_0002" and state["metrics"] == {"epoch": 2}
    assert latest_checkpoint_state(cfg)[1]["epoch"] == 2
    cfg.train.epochs = 3  # to be extended: not finished
    assert finished_run(cfg) is None


CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "digits.yaml")


def test_a_missing_dataset_is_named_before_ray_starts(tmp_path, capsys, monkeypatch):
    from dssn.cli import main
    from dssn.train import launcher

    started = []
    monkeypatch.setattr(launcher, "ensure_ray", lambda cfg: started.append(cfg) or False)

    missing = tmp_path / "no-such-shards"
    args = ["train", "--config", CONFIG, "--storage", str(tmp_path / "runs"), "--name", "x"]
    assert main(args + [f"data.root={missing}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dssn: data error: ") and str(missing / "dataset.json") in err
    assert "Traceback" not in err
    assert started == []  # failed in the driver, before any Ray start
    assert not (tmp_path / "runs").exists()  # and before the run directory was made


def test_a_class_count_that_is_not_the_datasets_is_a_config_error(
    tiny_digits, tmp_path, capsys, monkeypatch
):
    from dssn.cli import main
    from dssn.train import launcher
    from dssn.tune import tuner

    # were the check gone, fail at once instead of training or searching for minutes
    monkeypatch.setattr(launcher, "ensure_ray", lambda cfg: pytest.fail("Ray was started"))
    monkeypatch.setattr(tuner, "run_search", lambda *a, **k: pytest.fail("a search was run"))
    for command in ("train", "tune"):
        args = [command, "--config", CONFIG, "--storage", str(tmp_path / command)]
        assert main(args + [f"data.root={tiny_digits}", "model.num_classes=21"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("dssn: config error: model.num_classes=21, but "), err
        assert "has 11 classes: set model.num_classes=11" in err
        assert not (tmp_path / command).exists()


def test_the_parts_a_method_reads_must_have_rows(tiny_digits, tmp_path):
    from dssn.config import load_config
    from dssn.data.format import ShardError
    from dssn.data.pipeline import check_training_data

    info = json.loads((tiny_digits / "dataset.json").read_text())
    checked = check_training_data(load_config(CONFIG, [f"data.root={tiny_digits}"]))
    assert checked["counts"] == info["counts"]
    info["counts"]["unlabeled"] = 0  # e.g. a folder prepared with every image labeled
    (tmp_path / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(ShardError, match="'unlabeled' has no rows"):
        check_training_data(load_config(CONFIG, [f"data.root={tmp_path}"]))
    supervised = load_config(CONFIG, [f"data.root={tmp_path}", "method=supervised"])
    assert check_training_data(supervised)["counts"]["unlabeled"] == 0  # it reads no unlabeled


def test_print_config_shows_the_resolved_settings_and_starts_nothing(tmp_path, capsys, monkeypatch):
    import yaml

    from dssn.cli import main
    from dssn.data import pipeline
    from dssn.train import launcher

    def never(*_, **__):
        raise AssertionError("--print-config read the data or started Ray")

    monkeypatch.setattr(launcher, "ensure_ray", never)
    monkeypatch.setattr(pipeline, "check_training_data", never)
    storage = tmp_path / "runs"
    code = main([
        "train", "--config", str(DIGITS_CONFIG), "--print-config", "--workers", "2",
        "--storage", str(storage), "train.epochs=3", "temperature=0.2", "data.root=/nowhere",
    ])  # fmt: skip
    assert code == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["epochs"] == 3 and shown["train"]["workers"] == 2
    assert shown["dssn"]["temperature"] == 0.2  # a unique name resolves to its dotted path
    assert shown["train"]["amp"] == "bf16"  # from the file; the rest from the defaults
    assert shown["optim"]["momentum"] == Config().optim.momentum
    assert not storage.exists()  # nothing written


def test_the_schedule_line_names_the_global_batch_and_the_steps():
    from dssn.config import set_values
    from dssn.train.launcher import describe_schedule

    info = {"counts": {"labeled": 92, "unlabeled": 10490, "val": 1449}}
    cfg = set_values(Config(), {"train.workers": 4, "data.batch_size": 2, "train.epochs": 80})
    assert describe_schedule(cfg, info) == (
        "dssn: global batch 2 a worker x 4 workers = 8 labeled images, and as many unlabeled "
        "images and CutMix partners, a step; 1311 steps an epoch, 104880 in all"
    )  # 10490 // 8 = 1311
    one = set_values(cfg, {"train.workers": 1, "data.batch_size": 8, "method": "supervised"})
    assert describe_schedule(one, info).startswith(
        "dssn: global batch 8 a worker x 1 worker = 8 labeled images, a step; 1311 steps"
    )
    # on one smaller GPU: 2 a step, 4 micro-batches accumulated: the 4-GPU line's batch and steps
    small = set_values(cfg, {"train.workers": 1, "train.accumulate": 4})
    assert describe_schedule(small, info) == (
        "dssn: global batch 2 a worker x 1 worker x 4 micro-batches accumulated = 8 labeled "
        "images, and as many unlabeled images and CutMix partners, a step; 1311 steps an "
        "epoch, 104880 in all"
    )


def worker_traceback(error: BaseException) -> str:
    """The traceback text Ray Train keeps of a worker's exception."""
    import traceback

    return "".join(traceback.format_exception(error))


def shard_error_in_a_ray_data_task() -> BaseException:
    """A ShardError raised from the decoder's error inside a task, wrapped by Ray Data (as a
    damaged row surfaces in a train worker)."""
    from dssn.data.format import ShardError

    try:
        try:
            try:
                raise RuntimeError("Out of bound read in decode_png")
            except RuntimeError as e:
                raise ShardError("/d/unlabeled/part-00003.parquet: row 'a7': its image") from e
        except ShardError as e:
            raise ValueError("UDF failed to process a data block.") from e
    except ValueError as e:
        return e


def test_failure_causes_name_each_workers_cause_from_its_whole_traceback():
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    from dssn.train.launcher import failure_causes

    damaged = shard_error_in_a_ray_data_task()
    try:
        raise MemoryError("CUDA out of memory") from None
    except MemoryError as e:
        oom = e
    error = WorkerGroupError(
        "Training failed due to worker errors: … (Output truncated) …",
        {
            1: UserExceptionWithTraceback(oom, worker_traceback(oom)),
            0: UserExceptionWithTraceback(damaged, worker_traceback(damaged)),
        },
    )
    assert failure_causes(error) == [
        "rank 0: ShardError: /d/unlabeled/part-00003.parquet: row 'a7': its image",
        "rank 1: MemoryError: CUDA out of memory",
    ]
    # no exception of ours in the chain: its root (printed first), not Ray's wrapper
    wrapped = ValueError("UDF failed")
    wrapped.__cause__ = RuntimeError("Out of bound read")
    text = worker_traceback(wrapped)
    assert text.index("RuntimeError") < text.index("ValueError")
    only = WorkerGroupError("…", {0: UserExceptionWithTraceback(wrapped, text)})
    assert failure_causes(only) == ["rank 0: RuntimeError: Out of bound read"]
    assert failure_causes(ControllerError(KeyError("x"))) == ["controller: KeyError: 'x'"]
    assert failure_causes(RuntimeError("not Ray's")) == []


def test_a_failed_run_ends_with_its_cause(tmp_path, capsys, monkeypatch):
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError

    from dssn.cli import main
    from dssn.data import pipeline
    from dssn.train import launcher

    damaged = shard_error_in_a_ray_data_task()
    failure = UserExceptionWithTraceback(damaged, worker_traceback(damaged))

    def fit(*_, **__):
        raise WorkerGroupError("Training failed: … (Output truncated) …", {0: failure})

    monkeypatch.setattr(pipeline, "check_training_data", lambda cfg: {"counts": {"unlabeled": 8}})
    monkeypatch.setattr(launcher, "ensure_ray", lambda cfg: False)
    monkeypatch.setattr(launcher, "fit", fit)
    code = main(["train", "--config", str(DIGITS_CONFIG), "--storage", str(tmp_path / "runs")])
    assert code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (
        "dssn train: the run failed: rank 0: ShardError: "
        "/d/unlabeled/part-00003.parquet: row 'a7': its image"
    )


def test_a_missing_or_mismatched_init_checkpoint_is_named_before_ray_starts(
    tiny_digits, tmp_path, capsys, monkeypatch
):
    from dssn.cli import main
    from dssn.config import load_config
    from dssn.model import build_model
    from dssn.train import launcher
    from dssn.train.checkpoint import save_checkpoint

    monkeypatch.setattr(launcher, "ensure_ray", lambda cfg: pytest.fail("Ray was started"))
    args = ["train", "--config", CONFIG, "--storage", str(tmp_path / "runs"), "--name", "x",
            f"data.root={tiny_digits}"]  # fmt: skip
    missing = tmp_path / "no-such-run"
    assert main(args + [f"model.init={missing}"]) == 2
    err = capsys.readouterr().err
    assert err == f"dssn: checkpoint error: model.init: checkpoint not found: {missing}\n"
    other = load_config(CONFIG, ["model.width=8"])  # another architecture's checkpoint
    net = build_model(other.model)
    state = {"epoch": 1, "iteration": 4, "config": other.to_dict()}
    save_checkpoint(tmp_path / "narrow", student=net, teacher=net, optimizer=None, state=state)
    assert main(args + [f"model.init={tmp_path / 'narrow'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dssn: checkpoint error: ") and "width=8" in err and "width=32" in err


def test_ctrl_c_names_the_last_checkpoint_and_how_to_go_on(
    tiny_digits, tmp_path, capsys, monkeypatch
):
    from dssn.cli import main
    from dssn.config import load_config
    from dssn.model import build_model
    from dssn.train import launcher
    from dssn.train.checkpoint import save_checkpoint

    def stopped(cfg, resume):
        raise KeyboardInterrupt

    monkeypatch.setattr(launcher, "ensure_ray", lambda cfg: False)
    monkeypatch.setattr(launcher, "fit", stopped)
    args = ["train", "--config", CONFIG, "--storage", str(tmp_path), "--name", "run",
            f"data.root={tiny_digits}"]  # fmt: skip
    assert main(args) == 130
    assert "interrupted before the first epoch ended" in capsys.readouterr().err
    cfg = load_config(CONFIG, [f"data.root={tiny_digits}"])
    net = build_model(cfg.model)
    for epoch in (1, 2):
        state = {"epoch": epoch, "iteration": 400 * epoch, "config": cfg.to_dict()}
        save_checkpoint(tmp_path / "run" / f"checkpoint_epoch_000{epoch}", student=net,
                        teacher=net, optimizer=None, state=state)  # fmt: skip
    assert main(args) == 130
    err = capsys.readouterr().err
    assert (
        f"the last checkpoint is {tmp_path / 'run' / 'checkpoint_epoch_0002'} (epoch 2/8, " in err
    )
    assert "iteration 800). The same command (the same --name and --storage) continues" in err

    def aborted(cfg, resume):  # Ray Train's SIGINT handler: the run aborted, exit
        raise SystemExit(0)

    class Result:  # or fit returns the aborted run's result: its last report, epoch 2 of 8
        metrics = {"epoch": 2}

    for fit in (aborted, lambda cfg, resume: Result()):
        monkeypatch.setattr(launcher, "fit", fit)
        assert main(args) == 130
        assert "interrupted; the last checkpoint is" in capsys.readouterr().err

"""Training on the session's real local Ray instance, on tiny digits shards.

Each TorchTrainer start costs ~15-20 s here, so the scenarios share two runs:

- the main run (through ``dssn train``): 2 CPU workers, 2 epochs; the loss of iteration 1 is
  made NaN with ``nan_policy: skip``; rank 1 SIGKILLs itself at the first iteration of epoch 2
  and Ray Train (``max_failures: 1``) restarts the workers from the epoch-1 checkpoint.
  Its checkpoint then serves ``dssn eval`` (dssn and reference formats), ``dssn predict`` and
  the architecture-mismatch error, all without Ray.
- the NaN run: 1 worker, ``nan_policy: error``: stops naming the step; the epoch-1 checkpoint
  stays intact.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dssn.cli import main
from dssn.config import Config, load_config
from dssn.data.format import iter_rows, read_dataset_info
from dssn.data.pipeline import iter_val_samples
from dssn.train import checkpoint as ckpt
from dssn.train import history
from dssn.train.inference import load_for_inference

pytestmark = pytest.mark.ray

ITERS = 3  # per epoch
EPOCHS = 2
KILL_AT = ITERS  # first iteration of epoch 2 (0-based global iteration)
NAN_AT = 1  # second iteration of epoch 1


def write_config(path: Path, shards: Path, storage: Path, **train) -> Path:
    """A tiny experiment YAML: tiny backbone, 32 px crops, few iterations."""
    classes = len(read_dataset_info(shards)["classes"])
    data = {
        "name": "tiny",
        "model": {"backbone": "tiny", "width": 8, "num_classes": classes},
        "optim": {"lr": 0.01},
        "data": {"root": str(shards), "crop_size": 32, "batch_size": 2},
        "train": {
            "epochs": EPOCHS,
            "iters_per_epoch": ITERS,
            "log_every": 1,
            "cpus_per_worker": 1,
            "threads_per_worker": 1,
            "storage": str(storage),
            **train,
        },
    }
    path.write_text(yaml.safe_dump(data))
    return path


def latest_checkpoint(run_dir: Path) -> Path:
    """The checkpoint with the highest iteration among the run's checkpoint directories."""
    dirs = [d for d in run_dir.glob("checkpoint_*") if ckpt.is_checkpoint_dir(d)]
    assert dirs, f"no checkpoint in {run_dir}"
    return max(dirs, key=lambda d: ckpt.read_state(d)["iteration"])


@pytest.fixture(scope="module")
def main_run(ray_instance, tiny_digits, tmp_path_factory):
    """The 2-worker run through the CLI; returns (config path, run dir, final metrics, log)."""
    tmp = tmp_path_factory.mktemp("main-run")
    config = write_config(
        tmp / "tiny.yaml",
        tiny_digits,
        tmp / "runs",
        fail_at_iter=KILL_AT,
        max_failures=1,
        nan_at_iter=NAN_AT,
        nan_policy="skip",
        keep_checkpoints=1,
    )
    code = main(["train", "--config", str(config), "--workers", "2", "--name", "main"])
    assert code == 0
    run_dir = tmp / "runs" / "main"
    metrics = json.loads((run_dir / "summary.json").read_text())
    return config, run_dir, metrics


def test_two_worker_run_reports_student_and_teacher_miou(main_run, tiny_digits):
    _, run_dir, m = main_run
    classes = len(read_dataset_info(tiny_digits)["classes"])
    assert m["epoch"] == EPOCHS and m["iteration"] == EPOCHS * ITERS
    for who in ("teacher", "student"):
        assert 0.0 <= m[f"{who}_miou"] <= 1.0
        assert len(m[f"{who}_iou"]) == classes
        assert m[f"final_{who}_miou"] == m[f"{who}_miou"]
    assert m["best_teacher_miou"] >= m["teacher_miou"]
    assert 1 <= m["best_epoch"] <= EPOCHS
    assert m["images_per_s"] > 0 and 0.0 <= m["data_wait"] <= 1.0
    for key in ("loss", "loss_x", "loss_s1", "loss_img", "mask_ratio"):
        assert np.isfinite(m[key]), key
    # the run wrote its resolved config and a summary table beside its checkpoints
    assert load_config(run_dir / "config.yaml").train.workers == 2
    table = (run_dir / "summary.md").read_text()
    assert "teacher final" in table and "mIoU" in table


def test_killed_worker_run_resumes_from_the_checkpoint_iteration(main_run):
    _, run_dir, m = main_run
    assert (run_dir / f".fault_injected_at_iter_{KILL_AT}").is_file()  # rank 1 did die
    assert m["restarts"] == 1
    # the restarted workers began at the epoch-1 checkpoint's iteration, not at zero
    assert m["resumed_from_iteration"] == ITERS
    assert m["iteration"] == EPOCHS * ITERS


def test_tensorboard_shows_each_step_and_evaluation_once_across_the_restart(main_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir, m = main_run
    board = EventAccumulator(str(run_dir / "tensorboard"))
    board.Reload()
    records = history.read_csv(run_dir / history.HISTORY_CSV)
    teacher = [(e.step, e.value) for e in board.Scalars("eval/teacher_miou")]
    assert [step for step, _ in teacher] == [ITERS, 2 * ITERS]  # epoch 1's from the first attempt
    for (_, value), record in zip(teacher, records, strict=True):
        assert value == pytest.approx(record["teacher_miou"], abs=1e-6)
    assert teacher[-1][1] == pytest.approx(m["teacher_miou"], abs=1e-6)
    assert len(board.Scalars("eval/teacher_iou/background")) == EPOCHS
    steps = [e.step for e in board.Scalars("train/lr")]  # log_every 1: every step, once
    assert steps == list(range(1, EPOCHS * ITERS + 1))
    # the first val images, with their ground truth and the teacher's prediction
    assert board.Tags()["images"] == [f"predictions/{i}" for i in range(4)]
    assert [e.step for e in board.Images("predictions/0")] == [ITERS, 2 * ITERS]


def test_a_local_ray_starts_no_preemption_watcher(main_run):
    """One local node is never drained: the Train controller of a local Ray started by dssn
    runs without its PreemptionWatcher actor (the state API lists dead actors too)."""
    from ray.util.state import list_actors

    controllers = list_actors(filters=[("class_name", "=", "TrainController")])
    assert controllers  # the query sees the run's actors
    assert list_actors(filters=[("class_name", "=", "PreemptionWatcher")]) == []


def test_history_keeps_each_epoch_once_across_the_restart(main_run):
    _, run_dir, m = main_run
    records = history.read_csv(run_dir / history.HISTORY_CSV)
    assert [r["epoch"] for r in records] == [1, 2]
    assert [r["iteration"] for r in records] == [ITERS, 2 * ITERS]
    # epoch 1 by the first attempt (its record came back with the epoch-1 checkpoint), epoch 2
    # by the restarted one
    assert [r["restarts"] for r in records] == [0, 1]
    assert records[0]["nan_skipped"] == 1
    assert records[-1]["teacher_miou"] == pytest.approx(m["teacher_miou"])
    assert all(r["images_per_s"] > 0 and np.isfinite(r["loss_x"]) for r in records)
    with Image.open(run_dir / history.CURVES_PNG) as png:
        assert png.size[0] > png.size[1]


def test_rerunning_a_finished_run_prints_its_summary_without_ray(main_run, monkeypatch, capsys):
    import dssn.train.launcher as launcher

    config, run_dir, m = main_run

    def no_ray(cfg):
        raise AssertionError("a finished run started Ray")

    monkeypatch.setattr(launcher, "ensure_ray", no_ray)
    (run_dir / "curves.png").unlink()
    assert main(["train", "--config", str(config), "--workers", "2", "--name", "main"]) == 0
    out = capsys.readouterr().out
    assert f"already ran its {EPOCHS} epochs" in out and "teacher final" in out
    again = json.loads((run_dir / "summary.json").read_text())
    assert again["iteration"] == m["iteration"] and again["teacher_iou"] == m["teacher_iou"]
    assert (run_dir / "curves.png").is_file()  # written again from the latest checkpoint


def test_old_checkpoints_are_pruned_keeping_best_and_latest(main_run):
    _, run_dir, m = main_run
    kept = {d.name: ckpt.read_state(d) for d in run_dir.glob("checkpoint_epoch_*")}
    latest = f"checkpoint_epoch_{EPOCHS:04d}"
    # keep_checkpoints=1: the best by teacher mIoU, and the latest (always kept); the rest go
    assert latest in kept and len(kept) <= 2
    for name, state in kept.items():
        assert name == latest or state["teacher_miou"] == m["best_teacher_miou"]
    assert kept[latest]["teacher_miou"] == m["teacher_miou"]


def test_nan_skip_policy_counts_across_the_restart(main_run):
    _, _, m = main_run
    assert m["nan_skipped"] == 1  # skipped in epoch 1, carried through the checkpoint


def test_final_checkpoint_loads_without_ray(main_run):
    _, run_dir, m = main_run
    final = latest_checkpoint(run_dir)
    state = ckpt.read_state(final)
    assert state["epoch"] == EPOCHS and state["iteration"] == m["iteration"]
    assert state["best_teacher_miou"] == pytest.approx(m["best_teacher_miou"])
    loaded = load_for_inference(final)
    assert set(loaded.models) == {"student", "teacher"}
    assert load_for_inference(run_dir).source == str(final)  # a run: its last checkpoint
    assert len(torch.load(final / "rng.pt", weights_only=True)) == 2  # one state per worker


def test_dssn_eval_reproduces_the_reported_miou(main_run, tiny_digits, tmp_path, capsys):
    _, run_dir, m = main_run
    final = latest_checkpoint(run_dir)
    args = ["eval", "--checkpoint", str(final), "--data", str(tiny_digits), "--out", str(tmp_path)]
    assert main(args) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["teacher_miou"] == pytest.approx(m["teacher_miou"], abs=1e-6)
    assert result["student_miou"] == pytest.approx(m["student_miou"], abs=1e-6)
    assert (tmp_path / "eval.csv").read_text().startswith("class,student,teacher")
    assert "| mIoU |" in (tmp_path / "eval.md").read_text()
    out = capsys.readouterr().out
    assert "mIoU" in out and "teacher's largest confusions" in out
    # the confusion matrices count every labelled val pixel once, by true class
    masks_and_images = list(iter_val_samples(load_config(main_run[0]), rank=0, world_size=1))
    masks = [mask for _, mask in masks_and_images]
    truth = np.bincount(torch.cat([m.flatten() for m in masks]).numpy(), minlength=256)
    for name in ("teacher", "student"):
        rows = list(csv.reader((tmp_path / f"confusion-{name}.csv").open()))
        counts = np.array([[int(n) for n in row[1:]] for row in rows[1:]])
        assert counts.sum(axis=1).tolist() == truth[: len(counts)].tolist()
    assert (tmp_path / "confusion.png").stat().st_size > 0
    # every val image scored once, worst first; the worst drawn as image | truth | prediction
    ids = [row["id"] for row in iter_rows(tiny_digits, "val", ["id"])]
    rows = list(csv.DictReader((tmp_path / "per-image-teacher.csv").open()))
    assert sorted(row["id"] for row in rows) == sorted(ids)
    scores = [float(row["miou"]) for row in rows]
    assert scores == sorted(scores)
    assert "teacher's lowest per-image mIoU: " + f"{rows[0]['id']} {rows[0]['miou']}" in out
    drawn = sorted((tmp_path / "worst-teacher").glob("*.png"))
    assert [p.name for p in drawn] == [f"{i:02d}_{r['id']}.png" for i, r in enumerate(rows[:8], 1)]
    first = np.asarray(Image.open(drawn[0]))
    image, mask = masks_and_images[ids.index(rows[0]["id"])]
    assert first.shape == (mask.shape[0], 3 * mask.shape[1], 3)
    assert np.array_equal(first[:, : mask.shape[1]], image.permute(1, 2, 0).numpy())


def test_eval_on_data_of_another_class_count_is_a_config_error(
    main_run, tiny_digits, tmp_path, capsys
):
    _, run_dir, _ = main_run
    info = json.loads((tiny_digits / "dataset.json").read_text())
    info["classes"] += [f"extra{i}" for i in range(10)]  # a 21-class dataset
    (tmp_path / "dataset.json").write_text(json.dumps(info))
    final = latest_checkpoint(run_dir)
    args = ["eval", "--checkpoint", str(final), "--data", str(tmp_path), "--out", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "model.num_classes=11, but" in err and "has 21 classes" in err
    assert not (tmp_path / "eval.json").exists()


def test_eval_on_a_reference_format_checkpoint(main_run, tiny_digits, tmp_path):
    config, run_dir, m = main_run
    final = latest_checkpoint(run_dir)
    weights = torch.load(final / "model.pt", weights_only=True)
    reference = tmp_path / "best.pth"  # DSSN/UniMatch: {'model': DDP state dict}
    torch.save({"model": {"module." + k: v for k, v in weights.items()}}, reference)
    args = ["eval", "--checkpoint", str(reference), "--config", str(config),
            "--data", str(tiny_digits), "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(args) == 0
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert result["student_miou"] == pytest.approx(m["student_miou"], abs=1e-6)
    assert "teacher_miou" not in result  # the file holds only a 'model'


def test_eval_with_test_time_scales_and_flip(main_run, tiny_digits, tmp_path, capsys):
    _, run_dir, _ = main_run
    final = latest_checkpoint(run_dir)
    args = ["eval", "--checkpoint", str(final), "--data", str(tiny_digits), "--out",
            str(tmp_path), "--scales", "0.75", "1", "1.25", "--flip", "--worst", "0"]  # fmt: skip
    assert main(args) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["scales"] == [0.75, 1.0, 1.25] and result["flip"] is True
    assert 0.0 <= result["teacher_miou"] <= 1.0
    assert ", mode original, scales 0.75 1 1.25, flip" in capsys.readouterr().out


def test_another_architecture_checkpoint_is_a_clear_error(main_run, tmp_path):
    config, run_dir, _ = main_run
    other = yaml.safe_load(Path(config).read_text())
    other["model"]["width"] = 16
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(ckpt.CheckpointError) as err:
        load_for_inference(latest_checkpoint(run_dir), config=tmp_path / "other.yaml")
    msg = str(err.value)
    assert "trained as backbone=tiny" in msg and "width=8" in msg
    assert "the model here is backbone=tiny" in msg and "width=16" in msg
    assert "shape mismatches" in msg


def test_predict_writes_coloured_masks_and_overlays(main_run, tiny_digits, tmp_path):
    _, run_dir, _ = main_run
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        array = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(array).save(images / f"scene{i}.png")
    out = tmp_path / "pred"
    final = latest_checkpoint(run_dir)
    assert main(["predict", "--checkpoint", str(final), "--images", str(images),
                 "--out", str(out)]) == 0  # fmt: skip
    palette = {tuple(c) for c in read_dataset_info(tiny_digits)["palette"]}
    for i in range(2):
        mask = np.asarray(Image.open(out / f"scene{i}_mask.png"))
        assert mask.shape == (40, 48, 3)
        assert {tuple(c) for c in mask.reshape(-1, 3)} <= palette
        assert (out / f"scene{i}_overlay.png").is_file()


def test_predict_skips_and_names_unreadable_images_and_draws_the_rest(main_run, tmp_path, capsys):
    _, run_dir, _ = main_run
    images = tmp_path / "images"
    images.mkdir()
    array = np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(array).save(images / "a.png")
    Image.fromarray(array).save(images / "a.jpg")  # same stem: neither overwrites the other
    Image.fromarray(array).save(images / "b.jpg")
    data = (images / "b.jpg").read_bytes()
    (images / "b.jpg").write_bytes(data[: len(data) // 2])  # truncated JPEG
    (images / "c.png").write_bytes(b"not a png at all")
    out = tmp_path / "pred"
    final = latest_checkpoint(run_dir)
    args = ["predict", "--checkpoint", str(final), "--images", str(images), "--out", str(out)]
    assert main(args) == 1  # some images could not be read
    captured = capsys.readouterr()
    assert f"skipped {images / 'b.jpg'}: not a readable image" in captured.out
    assert f"skipped {images / 'c.png'}: not a readable image" in captured.out
    assert ": 2 images -> 4 PNGs in " in captured.out
    assert f"2 of 4 images could not be read: {images / 'b.jpg'}, {images / 'c.png'}" in (
        captured.err
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "a.jpg_mask.png", "a.jpg_overlay.png", "a.png_mask.png", "a.png_overlay.png",
    ]  # fmt: skip
    nested = images / "pred"  # outputs inside --images are not read back as inputs
    again = [*args[:3], "--images", str(images), "--out", str(nested)]
    assert main(again) == 1 and main(again) == 1
    assert sorted(p.name for p in nested.iterdir())[:2] == ["a.jpg_mask.png", "a.jpg_overlay.png"]
    assert len(list(nested.iterdir())) == 4  # still the two drawable images' PNGs
    assert main([*args[:3], "--images", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "not an image folder or image file" in capsys.readouterr().err


def test_nan_error_names_the_step_and_keeps_the_last_checkpoint(
    ray_instance, tiny_digits, tmp_path
):
    from dssn.train.launcher import fit

    iters = 2
    config = write_config(
        tmp_path / "nan.yaml",
        tiny_digits,
        tmp_path / "runs",
        workers=1,
        iters_per_epoch=iters,
        nan_at_iter=iters + 1,  # second step of epoch 2
        nan_policy="error",
        name="nan",
    )
    cfg: Config = load_config(config)
    with pytest.raises(Exception, match=r"non-finite loss \(nan\) at epoch 2/2, step 2/2") as err:
        fit(cfg)
    assert "global iteration 3" in str(err.value)
    good = latest_checkpoint(tmp_path / "runs" / "nan")
    state = ckpt.read_state(good)
    assert state["epoch"] == 1 and state["iteration"] == iters  # epoch 1's, untouched
    load_for_inference(good)  # and it is whole

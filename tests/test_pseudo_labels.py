"""benchmarks/pseudo_labels.py: per-class pseudo-label counts under each selection rule, by hand
and end to end on a tiny checkpoint over the tiny digits (unlabeled masks rendered again)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dssn.config import Config
from dssn.data import digits
from dssn.data import format as fmt
from dssn.model import build_model
from dssn.train import checkpoint as ckpt

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "pseudo_labels.py"
spec = importlib.util.spec_from_file_location("pseudo_labels", SCRIPT)
pseudo_labels = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pseudo_labels)


def _logits(probs: list[list[float]]) -> torch.Tensor:
    """(1, C, 1, N) logits whose softmax over C is ``probs`` (one row of C values per pixel)."""
    return torch.tensor(probs).log().T[None, :, None, :]


def test_tally_by_hand():
    cfg = Config()
    cfg.dssn.threshold = 0.8
    # five pixels of three classes; the last one is ignored
    logits = _logits(
        [
            [0.9, 0.05, 0.05],
            [0.1, 0.85, 0.05],
            [0.6, 0.3, 0.1],
            [0.05, 0.05, 0.9],
            [0.9, 0.05, 0.05],
        ]
    )
    mask = torch.tensor([[[0, 1, 1, 1, 255]]])  # pixel 2 is a 1 labelled 0; pixel 3 a 1 labelled 2
    out = pseudo_labels.tally(logits, mask, cfg, rules=("none", "threshold"))
    assert out["pixels"].tolist() == [1, 3, 0]
    # rows = truth, columns = pseudo-label
    assert out["none"].tolist() == [[1, 0, 0], [1, 1, 1], [0, 0, 0]]
    assert out["threshold"].tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 0]]  # 0.6 < 0.8: dropped
    twice = pseudo_labels.add(out, out)
    assert twice["none"].tolist() == [[2, 0, 0], [2, 2, 2], [0, 0, 0]]
    assert twice["pixels"].tolist() == [2, 6, 0]


def test_tally_rejects_a_class_id_the_model_does_not_have():
    with pytest.raises(ValueError, match=r"mask class ids \[7\] outside 0..2"):
        pseudo_labels.tally(_logits([[0.5, 0.25, 0.25]]), torch.tensor([[[7]]]), Config())


def _run_dir(tmp_path: Path, root: Path) -> Path:
    cfg = Config()
    cfg.model.backbone, cfg.model.width, cfg.model.num_classes = "tiny", 8, digits.NUM_CLASSES
    cfg.data.root, cfg.data.batch_size = str(root), 4
    cfg.train.amp = "none"
    torch.manual_seed(0)
    model = build_model(cfg.model)
    state = {"epoch": 1, "iteration": 10, "config": cfg.to_dict()}
    for epoch in (1, 2):
        ckpt.save_checkpoint(
            tmp_path / "run" / f"checkpoint_epoch_{epoch:04d}",
            student=model, teacher=model, optimizer=None, state={**state, "epoch": epoch},
        )  # fmt: skip
    return tmp_path / "run"


def _table(out: str) -> dict[str, list[str]]:
    return {
        line.split()[0]: line.split()[1:]
        for line in out.splitlines()
        if re.match(r"^(background|\d)\s+\d+\s", line)
    }


def test_end_to_end_on_the_unlabeled_digits(tiny_digits, tmp_path, capsys):
    run = _run_dir(tmp_path, tiny_digits)
    assert pseudo_labels.main([str(run), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert f"{run}: teacher on 36 unlabeled scenes, BatchNorm train" in out  # 48 x (1 - 1/4)
    table = _table(out)
    assert list(table) == digits.CLASSES
    # the unlabeled shards have no masks: the ground truth is the scenes rendered again
    spec = fmt.read_shard_metadata(fmt.list_shards(tiny_digits, "unlabeled")[0])[1]
    spec = digits.DigitsSpec(**json.loads(spec[digits.FOOTER_KEY]))
    first = digits.labeled_count(spec)
    counts = np.zeros(digits.NUM_CLASSES, np.int64)
    for index in range(first, spec.n_train):
        counts += np.bincount(digits.render_scene(spec, "train", index)[1].ravel(), minlength=11)
    for c, name in enumerate(digits.CLASSES):
        assert int(table[name][0]) == counts[c]
        if counts[c] == 0:
            assert table[name][1:9] == ["-"] * 4
            continue
        # columns: pixels, then right / wrong per rule (dssn, threshold, topk, none)
        cells = [float(x) for x in table[name][1:] if x != "/"][:8]
        right, wrong = cells[0::2], cells[1::2]
        assert right[3] + wrong[3] == pytest.approx(100, abs=0.11)  # none: every pixel counts
        for r in range(3):
            assert right[r] <= right[3] + 0.05 and wrong[r] <= wrong[3] + 0.05


def test_val_part_and_a_missing_part(tiny_digits, tmp_path, capsys):
    run = _run_dir(tmp_path, tiny_digits)
    checkpoint = run / "checkpoint_epoch_0001"
    assert pseudo_labels.main([str(checkpoint), "--part", "val", "--bn", "eval"]) == 0
    out = capsys.readouterr().out
    assert "teacher on 12 val scenes, BatchNorm eval" in out
    empty = tmp_path / "empty"
    (empty / "val").mkdir(parents=True)
    with pytest.raises(SystemExit, match=f"no val shards under {empty}"):
        pseudo_labels.main([str(checkpoint), "--part", "val", "--data", str(empty)])
    with pytest.raises(SystemExit, match="neither a checkpoint nor a run"):
        pseudo_labels.main([str(tmp_path)])

"""The built-in digits dataset: deterministic, long-tailed, val digits unseen in training."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from dssn.data import format as fmt
from dssn.data.digits import (
    CLASSES,
    DigitsSpec,
    class_prior,
    generate,
    render_scene,
    source_split,
)

SMALL = dict(n_train=48, n_val=12, labeled_fraction=0.25, shard_rows=16)


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _masks(root: Path, part: str) -> list[np.ndarray]:
    return [
        fmt.decode_mask(m)
        for path in fmt.list_shards(root, part)
        for m in fmt.read_shard(path).column("mask").to_pylist()
    ]


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(a, seed=3, **SMALL)
    generate(b, seed=3, workers=2, **SMALL)  # worker count does not change the bytes
    generate(c, seed=4, **SMALL)
    assert _hashes(a) == _hashes(b)
    shards = [k for k in _hashes(a) if k.endswith(".parquet")]
    assert any(_hashes(a)[k] != _hashes(c).get(k) for k in shards)


def test_counts_schema_and_dataset_info(tmp_path):
    info = generate(tmp_path, **SMALL)
    assert info["counts"] == {"labeled": 12, "unlabeled": 36, "val": 12}
    assert info["classes"] == CLASSES and info["num_classes"] == 11
    assert len(info["palette"]) == 11 and info["ignore_index"] == 255
    assert info["generator"]["n_train"] == 48
    unlabeled = fmt.read_shard(fmt.list_shards(tmp_path, "unlabeled")[0])
    assert unlabeled.column("mask").null_count == unlabeled.num_rows
    labeled = fmt.read_shard(fmt.list_shards(tmp_path, "labeled")[0])
    assert labeled.column("mask").null_count == 0
    assert len(fmt.list_shards(tmp_path, "unlabeled")) == 3  # 36 rows at 16 per shard


def test_masks_hold_eleven_classes_and_match_image_size(tmp_path):
    generate(tmp_path, **SMALL)
    masks = _masks(tmp_path, "labeled") + _masks(tmp_path, "val")
    values = np.unique(np.concatenate([m.ravel() for m in masks]))
    assert values.min() == 0 and values.max() <= 10
    assert all(m.shape == (64, 64) for m in masks)
    assert all((m > 0).any() for m in masks)  # every scene has at least one digit


def test_class_prior_is_long_tailed():
    prior = class_prior(DigitsSpec())
    assert prior.sum() == pytest.approx(1.0)
    assert prior.min() < 0.1 * prior.max()
    # and the rendered scenes follow it: count digit instances over many scenes
    spec = DigitsSpec()
    counts = np.zeros(10)
    for i in range(300):
        _, mask = render_scene(spec, "train", i)
        for d in np.unique(mask[mask > 0]):
            counts[d - 1] += 1
    assert counts.min() < 0.1 * counts.max()


def test_val_scenes_use_unseen_source_digits():
    split = source_split(DigitsSpec())
    assert len(np.intersect1d(split["train"], split["val"])) == 0
    assert len(split["train"]) + len(split["val"]) == 1797


def test_mask_follows_the_visible_glyph():
    """Digit pixels differ in colour from the background pixels of the same scene."""
    spec = DigitsSpec()
    gaps = []
    for i in range(20):
        image, mask = render_scene(spec, "val", i)
        luma = image.astype(float) @ [0.299, 0.587, 0.114]
        for d in np.unique(mask[mask > 0]):
            glyph = mask == d
            ring = (mask == 0) & _dilate(glyph, 3) & ~glyph
            if glyph.sum() > 20 and ring.sum() > 20:
                gaps.append(abs(luma[glyph].mean() - luma[ring].mean()))
    assert np.median(gaps) > 40  # on 0..255: clearly visible strokes


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out


def test_bad_options_are_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown digits option"):
        generate(tmp_path, n_trian=10)
    with pytest.raises(ValueError, match="labeled_fraction"):
        generate(tmp_path, labeled_fraction=0.0)

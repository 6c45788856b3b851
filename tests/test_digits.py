"""The built-in digits dataset: deterministic, long-tailed, val handwriting unseen in training."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from dssn.config import load_config
from dssn.data import format as fmt
from dssn.data.digits import (
    CLASSES,
    PALETTE,
    DigitsSpec,
    class_prior,
    generate,
    labeled_count,
    make_spec,
    render_scene,
    scene_digits,
    source_digits,
    source_split,
    upscale_glyph,
)

SMALL = dict(n_train=40, n_val=10, labeled_fraction=0.25, shard_rows=16)
LUMA = np.array([0.299, 0.587, 0.114])
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _rows(root: Path, part: str) -> list[dict]:
    return list(fmt.iter_rows(root, part))


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(a, seed=3, **SMALL)
    generate(b, seed=3, workers=2, **SMALL)  # the worker count does not change the bytes
    generate(c, seed=4, **SMALL)
    hashes_a = _hashes(a)
    assert hashes_a == _hashes(b)
    shards = [k for k in hashes_a if k.endswith(".parquet")]
    assert len(shards) == 4  # labeled 10, unlabeled 30 (2 shards), val 10
    hashes_c = _hashes(c)
    assert all(hashes_a[k] != hashes_c[k] for k in shards)


def test_rerun_is_idempotent_and_other_options_are_refused(tmp_path):
    generate(tmp_path, **SMALL)
    before = _hashes(tmp_path)
    generate(tmp_path, **SMALL)
    assert _hashes(tmp_path) == before
    with pytest.raises(ValueError, match=r"part-00000\.parquet was not generated with these"):
        generate(tmp_path, **{**SMALL, "seed": 1})


def test_counts_schema_and_dataset_info(tmp_path):
    info = generate(tmp_path, **SMALL)
    assert info == fmt.read_dataset_info(tmp_path)
    assert info["name"] == "digits" and info["source"] == "sklearn digits"
    assert info["counts"] == {"labeled": 10, "unlabeled": 30, "val": 10}
    assert info["classes"] == CLASSES == ["background"] + list("0123456789")
    assert info["num_classes"] == 11 and info["ignore_index"] == 255
    assert info["palette"] == PALETTE and len({tuple(c) for c in PALETTE}) == 11
    assert info["split"] == "1/4" and info["seed"] == 0
    assert info["generator"]["n_train"] == 40 and info["generator"]["size_min"] > 0
    assert len(info["class_prior"]) == 10
    masks = [
        fmt.decode_mask(r["mask"]) for r in _rows(tmp_path, "labeled") + _rows(tmp_path, "val")
    ]
    counts = np.bincount(np.concatenate([m.ravel() for m in masks]), minlength=11)
    assert info["class_pixels"] == counts.tolist() and len(counts) == 11
    assert sorted(info["val_source_indices"]) == source_split(DigitsSpec())["val"].tolist()
    labeled, unlabeled = _rows(tmp_path, "labeled"), _rows(tmp_path, "unlabeled")
    assert all(r["mask"] is None for r in unlabeled)
    assert all(r["mask"] is not None for r in labeled + _rows(tmp_path, "val"))
    # the labeled scenes are the first training scenes, the unlabeled ones the rest
    assert [r["id"] for r in labeled + unlabeled] == [f"train-{i:05d}" for i in range(40)]
    assert len(fmt.list_shards(tmp_path, "unlabeled")) == 2  # 30 rows at 16 per shard


def test_default_split_is_one_sixteenth():
    spec = DigitsSpec()
    assert (spec.n_train, spec.n_val, labeled_count(spec)) == (2000, 300, 125)


def test_images_and_masks_decode_with_eleven_classes(tmp_path):
    generate(tmp_path, **SMALL)
    for row in _rows(tmp_path, "labeled") + _rows(tmp_path, "val"):
        image, mask = fmt.decode_image(row["image"]), fmt.decode_mask(row["mask"])
        size = DigitsSpec().scene_size
        assert image.shape == (size, size, 3) and mask.shape == (size, size)
        assert (row["height"], row["width"]) == (size, size)
        assert mask.max() <= 10 and (mask > 0).any() and (mask == 0).any()
        # the stored scene is exactly the rendered one
        kind, index = row["id"].split("-")
        ref_image, ref_mask = render_scene(make_spec(**SMALL), kind, int(index))
        assert np.array_equal(image, ref_image) and np.array_equal(mask, ref_mask)


def test_class_prior_is_long_tailed_and_scenes_follow_it():
    spec = DigitsSpec()
    prior = class_prior(spec)
    assert prior.sum() == pytest.approx(1.0)
    assert prior.min() < 0.1 * prior.max()
    counts = np.zeros(10)
    for i in range(400):
        for placed in scene_digits(spec, "train", i):
            counts[placed["digit"]] += 1
    assert counts.min() < 0.1 * counts.max()
    assert np.argmax(counts) == np.argmax(prior) and np.argmin(counts) == np.argmin(prior)
    assert not np.array_equal(class_prior(DigitsSpec(seed=1)), prior)  # order set by the seed


def test_val_scenes_use_only_unseen_source_digits():
    spec = DigitsSpec()
    split = source_split(spec)
    assert len(np.intersect1d(split["train"], split["val"])) == 0
    assert len(split["train"]) + len(split["val"]) == 1797
    _, labels = source_digits()
    assert set(np.unique(labels[split["val"]])) == set(range(10))  # stratified
    for kind, allowed in (("val", split["val"]), ("train", split["train"])):
        used = {p["source"] for i in range(60) for p in scene_digits(spec, kind, i)}
        assert used <= set(allowed.tolist())
        # each placed digit has the label of its source
        assert all(
            labels[p["source"]] == p["digit"]
            for i in range(20)
            for p in scene_digits(spec, kind, i)
        )


def test_mask_is_the_visible_glyph_and_the_last_digit_wins():
    spec = DigitsSpec()
    glyphs, _ = source_digits()
    checked = 0
    for i in range(40):
        _, mask = render_scene(spec, "train", i)
        placed = scene_digits(spec, "train", i)
        last = placed[-1]
        s, y, x = last["size"], last["top"], last["left"]
        on = upscale_glyph(glyphs[last["source"]], s) > spec.mask_threshold
        assert (mask[y : y + s, x : x + s][on] == last["digit"] + 1).all()
        # outside every digit's box the scene is background
        inside = np.zeros_like(mask, dtype=bool)
        for p in placed:
            inside[p["top"] : p["top"] + p["size"], p["left"] : p["left"] + p["size"]] = True
        assert (mask[~inside] == 0).all()
        checked += len(placed) > 1
    assert checked > 10  # enough multi-digit scenes were looked at


def test_glyph_pixels_stand_out_from_the_local_background():
    """Mask > 0 pixels differ in brightness from the background pixels around them."""
    spec = DigitsSpec()
    gaps = []
    for i in range(20):
        image, mask = render_scene(spec, "val", i)
        luma = image.astype(float) @ LUMA
        for d in np.unique(mask[mask > 0]):
            glyph = mask == d
            ring = (mask == 0) & _dilate(glyph, 3)
            if glyph.sum() > 20 and ring.sum() > 20:
                gaps.append(abs(luma[glyph].mean() - luma[ring].mean()))
    assert len(gaps) > 20 and np.median(gaps) > 60  # of 0..255: clearly visible strokes


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out


def test_bad_options_are_errors_naming_the_option(tmp_path):
    with pytest.raises(ValueError, match="unknown digits option.*n_trian"):
        generate(tmp_path, n_trian=10)
    with pytest.raises(ValueError, match="'labeled_fraction'"):
        generate(tmp_path, labeled_fraction=0.0)
    with pytest.raises(ValueError, match="'size_max'"):
        generate(tmp_path, size_max=80)
    with pytest.raises(ValueError, match="kind"):
        render_scene(DigitsSpec(), "test", 0)


def test_the_digits_config_loads_and_matches_the_dataset():
    cfg = load_config(CONFIG)
    assert cfg.model.num_classes == len(CLASSES)
    assert cfg.data.root == "shards/digits"
    assert cfg.data.crop_size <= DigitsSpec().scene_size

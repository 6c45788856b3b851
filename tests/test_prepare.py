"""``dssn prepare``: VOC / Cityscapes / folder round trips on fabricated trees, bad inputs,
idempotence and atomicity."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dssn.cli import main
from dssn.data import format as fmt
from dssn.data import prepare

PALETTE = [v for colour in fmt.default_palette(256) for v in colour]


def save_palette_mask(path: Path, mask: np.ndarray) -> None:
    im = Image.fromarray(mask, "P")
    im.putpalette(PALETTE)
    im.save(path)


def random_image(rng, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_voc(tmp_path: Path, n_train: int = 6, n_val: int = 2, n_labeled: int = 2):
    """A VOC-layout tree (JPEGs, palette PNG masks) and a splits dir with split '2'."""
    root = tmp_path / "VOC2012"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    rng = np.random.default_rng(0)
    names = [f"2007_{i:06d}" for i in range(n_train + n_val)]
    masks = {}
    for name in names:
        h, w = (int(v) for v in rng.integers(20, 40, 2))
        Image.fromarray(random_image(rng, h, w)).save(root / "JPEGImages" / f"{name}.jpg")
        masks[name] = rng.integers(0, 21, (h, w), dtype=np.uint8)
        masks[name][0, :3] = 255  # object borders
        save_palette_mask(root / "SegmentationClass" / f"{name}.png", masks[name])
    splits = tmp_path / "splits"
    (splits / "2").mkdir(parents=True)

    def line(n: str) -> str:
        return f"JPEGImages/{n}.jpg SegmentationClass/{n}.png"

    (splits / "train_aug.txt").write_text("\n".join(line(n) for n in names[:n_train]))
    (splits / "val.txt").write_text("\n".join(line(n) for n in names[n_train:]) + "\n")
    (splits / "2" / "labeled.txt").write_text("\n".join(line(n) for n in names[:n_labeled]))
    return root, splits, names, masks


def voc_args(root, splits, out, *extra):
    return ["prepare", "voc", "--root", str(root), "--splits-dir", str(splits), "--split", "2",
            "--out", str(out), "--workers", "1", "--no-progress", *extra]  # fmt: skip


def test_voc_round_trip(tmp_path, capsys):
    root, splits, names, masks = make_voc(tmp_path)
    out = tmp_path / "shards"
    assert main(voc_args(root, splits, out)) == 0
    info = fmt.read_dataset_info(out)
    assert info["counts"] == {"labeled": 2, "unlabeled": 4, "val": 2}
    assert info["classes"][15] == "person" and len(info["classes"]) == 21
    assert info["palette"] == fmt.default_palette(21) and info["split"] == "2"
    labeled = {r["id"]: r for r in fmt.iter_rows(out, "labeled")}
    assert set(labeled) == set(names[:2])
    row = labeled[names[0]]
    # original JPEG bytes stored, palette indices (not colours) in the mask
    assert row["image"] == (root / "JPEGImages" / f"{names[0]}.jpg").read_bytes()
    assert np.array_equal(fmt.decode_mask(row["mask"]), masks[names[0]])
    assert (row["height"], row["width"]) == masks[names[0]].shape
    unlabeled = list(fmt.iter_rows(out, "unlabeled"))
    assert {r["id"] for r in unlabeled} == set(names[2:6])
    assert all(r["mask"] is None for r in unlabeled)
    assert {r["id"] for r in fmt.iter_rows(out, "val")} == set(names[6:])
    assert "unlabeled        4 rows" in capsys.readouterr().out


def test_split_file_overrides_the_labeled_list(tmp_path):
    root, splits, names, _ = make_voc(tmp_path)
    custom = tmp_path / "mine.txt"
    custom.write_text(f"JPEGImages/{names[3]}.jpg SegmentationClass/{names[3]}.png\n")
    out = tmp_path / "shards"
    args = voc_args(root, splits, out, "--split-file", str(custom))
    assert main(args) == 0
    assert [r["id"] for r in fmt.iter_rows(out, "labeled")] == [names[3]]
    assert fmt.read_dataset_info(out)["counts"]["unlabeled"] == 5


def test_shipped_splits_unlabeled_is_train_minus_labeled(tmp_path):
    plan = prepare.voc_plan(tmp_path, split="92")  # plans only; no file is read
    assert len(plan.parts["labeled"]) == 92 and len(plan.parts["val"]) == 1449
    assert len(plan.parts["unlabeled"]) == 10582 - 92
    city = prepare.cityscapes_plan(tmp_path, split="1_16")
    assert len(city.parts["labeled"]) + len(city.parts["unlabeled"]) == 2975
    assert city.parts["labeled"][0].id.count("_") == 2  # "_leftImg8bit" stripped
    assert city.parts["labeled"][0].mask.endswith("_gtFine_labelTrainIds.png")


def make_cityscapes(tmp_path: Path):
    root = tmp_path / "cityscapes"
    rng = np.random.default_rng(1)
    splits = tmp_path / "csplits"
    (splits / "1_2").mkdir(parents=True)
    lines = {"train": [], "val": []}
    for split, city, count in (("train", "aachen", 4), ("val", "lindau", 2)):
        (root / "leftImg8bit" / split / city).mkdir(parents=True)
        (root / "gtFine" / split / city).mkdir(parents=True)
        for i in range(count):
            stem = f"{city}_{i:06d}_000019"
            image = f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png"
            mask = f"gtFine/{split}/{city}/{stem}_gtFine_labelTrainIds.png"
            Image.fromarray(random_image(rng, 16, 32)).save(root / image)
            ids = rng.integers(0, 19, (16, 32), dtype=np.uint8)
            ids[:, :4] = 255
            Image.fromarray(ids, "L").save(root / mask)
            lines[split].append(f"{image} {mask}")
    (splits / "train.txt").write_text("\n".join(lines["train"]))
    (splits / "val.txt").write_text("\n".join(lines["val"]))
    (splits / "1_2" / "labeled.txt").write_text("\n".join(lines["train"][:2]))
    return root, splits


def test_cityscapes_round_trip(tmp_path):
    root, splits = make_cityscapes(tmp_path)
    out = tmp_path / "shards"
    args = ["prepare", "cityscapes", "--root", str(root), "--splits-dir", str(splits),
            "--split", "1_2", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    info = fmt.read_dataset_info(out)
    assert info["num_classes"] == 19 and info["classes"][0] == "road"
    assert info["palette"][0] == [128, 64, 128]
    assert info["counts"] == {"labeled": 2, "unlabeled": 2, "val": 2}
    row = next(fmt.iter_rows(out, "val"))
    assert row["id"].startswith("lindau_") and not row["id"].endswith("leftImg8bit")
    mask = fmt.decode_mask(row["mask"])
    assert mask.shape == (16, 32) and (mask[:, :4] == 255).all() and mask[:, 4:].max() < 19


def make_folder(tmp_path: Path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    (images / "sub").mkdir(parents=True)
    masks.mkdir()
    rng = np.random.default_rng(2)
    for name in ("a", "b", "c", "sub/d", "e"):
        Image.fromarray(random_image(rng, 12, 10)).save(images / f"{name}.png")
    for name in ("a", "b", "c"):  # d and e are unlabeled: no masks
        Image.fromarray(rng.integers(0, 3, (12, 10), dtype=np.uint8), "L").save(
            masks / f"{name}.png"
        )
    classes = tmp_path / "classes.txt"
    classes.write_text("background 0 0 0\nred thing 255 0 0\n# comment\nblue 0 0 255\n")
    val = tmp_path / "val.txt"
    val.write_text("c.png\n")
    return images, masks, classes, val


def folder_args(images, masks, classes, val, out, *extra):
    return ["prepare", "folder", "--images", str(images), "--masks", str(masks), "--classes",
            str(classes), "--val-list", str(val), "--out", str(out), "--no-progress", *extra]  # fmt: skip


def test_folder_round_trip(tmp_path):
    images, masks, classes, val = make_folder(tmp_path)
    out = tmp_path / "shards"
    assert main(folder_args(images, masks, classes, val, out)) == 0
    info = fmt.read_dataset_info(out)
    assert info["classes"] == ["background", "red thing", "blue"]
    assert info["palette"] == [[0, 0, 0], [255, 0, 0], [0, 0, 255]]
    assert info["counts"] == {"labeled": 2, "unlabeled": 2, "val": 1}
    assert {r["id"] for r in fmt.iter_rows(out, "unlabeled")} == {"sub/d", "e"}
    labeled_list = tmp_path / "labeled.txt"
    labeled_list.write_text("a\n")
    out2 = tmp_path / "shards2"
    assert (
        main(folder_args(images, masks, classes, val, out2, "--labeled-list", str(labeled_list)))
        == 0
    )
    assert fmt.read_dataset_info(out2)["counts"] == {"labeled": 1, "unlabeled": 3, "val": 1}


def test_folder_of_rgb_colour_masks_reads_classes_by_colour(tmp_path, capsys):
    images, masks, classes, val = make_folder(tmp_path)
    colours = np.array([[0, 0, 0], [255, 0, 0], [0, 0, 255], [255, 255, 255]], np.uint8)
    ids = {}
    for name in ("a", "b", "c"):  # the same scenes as colour masks; white is 'ignore'
        ids[name] = np.random.default_rng(ord(name)).integers(0, 4, (12, 10))
        Image.fromarray(colours[ids[name]], "RGB").save(masks / f"{name}.png")
    classes.write_text(classes.read_text() + "ignore 255 255 255\n")
    out = tmp_path / "shards"
    assert main(folder_args(images, masks, classes, val, out)) == 0
    info = fmt.read_dataset_info(out)
    assert info["classes"] == ["background", "red thing", "blue"]  # 'ignore' is no class
    rows = {r["id"]: r for part in ("labeled", "val") for r in fmt.iter_rows(out, part)}
    assert set(rows) == {"a", "b", "c"}
    for name, row in rows.items():
        expected = np.where(ids[name] == 3, 255, ids[name])
        np.testing.assert_array_equal(fmt.decode_mask(row["mask"]), expected)

    Image.fromarray(np.full((12, 10, 3), 7, np.uint8), "RGB").save(masks / "b.png")
    out2 = tmp_path / "shards2"
    capsys.readouterr()
    assert main(folder_args(images, masks, classes, val, out2)) == 1
    err = capsys.readouterr().err
    assert f"{masks / 'b.png'}: mask colours [7, 7, 7] (120 px) are not in the classes file" in err

    classes.write_text("background\nred thing\nblue\n")  # no colours: RGB masks are ambiguous
    assert main(folder_args(images, masks, classes, val, tmp_path / "shards3")) == 1
    err = capsys.readouterr().err
    assert "mask has mode 'RGB'" in err and "classes file gives every class its colour" in err


def test_class_pixels_are_counted_and_a_class_no_mask_holds_is_named(tmp_path, capsys):
    images, masks, classes, val = make_folder(tmp_path)
    out = tmp_path / "shards"
    assert main(folder_args(images, masks, classes, val, out)) == 0
    expected = np.zeros(3, np.int64)
    for name in ("a", "b", "c"):  # labeled a, b and val c
        expected += np.bincount(np.asarray(Image.open(masks / f"{name}.png")).ravel(), minlength=3)
    assert fmt.read_dataset_info(out)["class_pixels"] == expected.tolist()
    assert "warning" not in capsys.readouterr().err
    (out / "dataset.json").unlink()  # a re-run reuses every shard: counts from their footers
    assert main(folder_args(images, masks, classes, val, out)) == 0
    assert fmt.read_dataset_info(out)["class_pixels"] == expected.tolist()

    for name in ("a", "b", "c"):  # binary masks, the foreground stored as 255
        fg = np.asarray(Image.open(masks / f"{name}.png")) > 0
        Image.fromarray(np.where(fg, 255, 0).astype(np.uint8), "L").save(masks / f"{name}.png")
    classes.write_text("background\nobject\n")
    out2 = tmp_path / "shards2"
    assert main(folder_args(images, masks, classes, val, out2)) == 0  # valid, but suspicious
    err = capsys.readouterr().err
    assert "warning: no labeled or val mask holds class 'object' (1)" in err
    share = 100 * (1 - expected[0] / expected.sum())
    assert f"{share:.1f}% of the mask pixels are 255, which means ignore" in err
    assert fmt.read_dataset_info(out2)["class_pixels"] == [int(expected[0]), 0]


def test_classes_file_colours_are_checked(tmp_path):
    def table(text: str):
        (tmp_path / "classes.txt").write_text(text)
        return prepare.read_class_table(tmp_path / "classes.txt")

    with pytest.raises(prepare.PrepareError, match="given twice"):
        table("a 1 2 3\nb 1 2 3\n")
    with pytest.raises(prepare.PrepareError, match="on every line or on none"):
        table("a\nb\nignore 9 9 9\n")
    names, palette, colours = table("a 1 2 3\nb 4 5 6\nIgnore 0 0 0\n")
    assert names == ["a", "b"] and palette == [[1, 2, 3], [4, 5, 6]]
    assert colours == {(1, 2, 3): 0, (4, 5, 6): 1, (0, 0, 0): 255}
    assert table("a\nb\n")[2] is None


# ----------------------------------------------------------------------------- bad inputs


def corrupt_jpeg(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # truncated: the decoder fails mid-image


def test_corrupt_labeled_jpeg_fails_with_path(tmp_path, capsys):
    root, splits, names, _ = make_voc(tmp_path)
    bad = root / "JPEGImages" / f"{names[1]}.jpg"
    corrupt_jpeg(bad)
    out = tmp_path / "shards"
    assert main(voc_args(root, splits, out)) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "does not decode" in err and "1 bad labeled/val" in err
    assert not (out / "dataset.json").exists()
    assert fmt.list_shards(out, "labeled") == []  # the bad sample's shard is not written
    assert len(fmt.list_shards(out, "unlabeled")) == 1  # the good ones are


def test_corrupt_unlabeled_image_is_skipped_and_counted(tmp_path, capsys):
    root, splits, names, _ = make_voc(tmp_path)
    bad = root / "JPEGImages" / f"{names[4]}.jpg"
    corrupt_jpeg(bad)
    out = tmp_path / "shards"
    assert main(voc_args(root, splits, out)) == 0
    assert "(1 unreadable, skipped)" in capsys.readouterr().out
    info = fmt.read_dataset_info(out)
    assert info["counts"]["unlabeled"] == 3 and info["skipped"]["unlabeled"] == 1
    assert str(bad) in info["skipped_samples"][0]
    # a re-run reuses the shard and still knows what was skipped
    assert main(voc_args(root, splits, out)) == 0
    assert fmt.read_dataset_info(out)["skipped"]["unlabeled"] == 1


@pytest.mark.parametrize(
    "defect, message",
    [("class37", "mask values [37] outside [0, 21)"), ("size", "differs from image"),
     ("missing", "mask file missing"), ("rgb", "mode 'RGB'")],
)  # fmt: skip
def test_bad_masks_are_reported(tmp_path, capsys, defect, message):
    root, splits, names, masks = make_voc(tmp_path)
    path = root / "SegmentationClass" / f"{names[7]}.png"  # a val sample
    mask = masks[names[7]].copy()
    if defect == "class37":
        mask[3, 3] = 37
        save_palette_mask(path, mask)
    elif defect == "size":
        save_palette_mask(path, mask[:-1])
    elif defect == "missing":
        path.unlink()
    else:
        Image.fromarray(np.stack([mask] * 3, -1)).save(path)
    assert main(voc_args(root, splits, tmp_path / "shards")) == 1
    err = capsys.readouterr().err
    assert str(path) in err and message in err


@pytest.mark.parametrize("content", [None, "", "\n\n"])
def test_missing_or_empty_split_file(tmp_path, capsys, content):
    root, splits, _, _ = make_voc(tmp_path)
    labeled = splits / "2" / "labeled.txt"
    if content is None:
        custom = tmp_path / "nope.txt"
        args = voc_args(root, splits, tmp_path / "out", "--split-file", str(custom))
    else:
        labeled.write_text(content)
        args = voc_args(root, splits, tmp_path / "out")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert ("not found" if content is None else "is empty") in err


def test_unknown_split_lists_the_available_ones(tmp_path, capsys):
    root, splits, _, _ = make_voc(tmp_path)
    args = voc_args(root, splits, tmp_path / "out")
    args[args.index("--split") + 1] = "93"
    assert main(args) == 2
    assert "unknown split '93'" in capsys.readouterr().err


def test_unwritable_output_directory(tmp_path, capsys):
    root, splits, _, _ = make_voc(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    assert main(voc_args(root, splits, blocker / "shards")) == 2
    assert "cannot write to output directory" in capsys.readouterr().err


def test_folder_errors(tmp_path):
    images, masks, classes, val = make_folder(tmp_path)
    with pytest.raises(prepare.PrepareError, match="val-list"):
        prepare.folder_plan(images, classes, masks)
    val.write_text("zzz.png\n")
    with pytest.raises(prepare.PrepareError, match="'zzz.png' is not an image"):
        prepare.folder_plan(images, classes, masks, val_list=val)
    classes.write_text("a 1 2 3\nb\n")
    with pytest.raises(prepare.PrepareError, match="on every line or on none"):
        prepare.read_classes_file(classes)


# ----------------------------------------------------------------------------- idempotence


def test_rerun_skips_finished_shards_and_redoes_only_failed_ones(tmp_path):
    root, splits, names, masks = make_voc(tmp_path, n_train=8, n_labeled=4)
    out = tmp_path / "shards"
    bad = root / "SegmentationClass" / f"{names[0]}.png"
    save_palette_mask(bad, masks[names[0]][:-2])  # size mismatch
    args = voc_args(root, splits, out, "--shard-rows", "2")
    assert main(args) == 1
    good = {p: os.stat(p).st_mtime_ns for part in fmt.PARTS for p in fmt.list_shards(out, part)}
    assert len(good) == 1 + 2 + 1  # one of two labeled shards, both unlabeled, val
    save_palette_mask(bad, masks[names[0]])  # fixed
    plan = prepare.voc_plan(root, "2", splits_dir=splits)
    summary = prepare.run(plan, out, shard_rows=2, progress=False)
    assert summary.ok and summary.shards_written == 1 and summary.shards_reused == 4
    assert all(os.stat(p).st_mtime_ns == t for p, t in good.items())
    assert fmt.read_dataset_info(out)["counts"] == {"labeled": 4, "unlabeled": 4, "val": 2}


def test_leftover_temp_file_and_garbage_shard_are_redone(tmp_path):
    root, splits, _, _ = make_voc(tmp_path)
    out = tmp_path / "shards"
    plan = prepare.voc_plan(root, "2", splits_dir=splits)
    prepare.run(plan, out, progress=False)
    shard = Path(fmt.list_shards(out, "unlabeled")[0])
    shard.write_bytes(b"garbage left by a crash")
    (shard.parent / ".part-00001.parquet.99.dead.tmp").write_bytes(b"half")
    summary = prepare.run(plan, out, progress=False)
    assert summary.shards_written == 1 and summary.shards_reused == 2
    assert fmt.read_shard(shard).num_rows == 4
    assert len(fmt.list_shards(out, "unlabeled")) == 1


def test_different_plan_into_same_output_is_refused(tmp_path):
    root, splits, names, _ = make_voc(tmp_path)
    out = tmp_path / "shards"
    prepare.run(prepare.voc_plan(root, "2", splits_dir=splits), out, progress=False)
    custom = tmp_path / "other.txt"
    custom.write_text(f"JPEGImages/{names[5]}.jpg SegmentationClass/{names[5]}.png")
    other = prepare.voc_plan(root, split_file=custom, splits_dir=splits)
    with pytest.raises(prepare.PrepareError, match="different preparation"):
        prepare.run(other, out, progress=False)
    summary = prepare.run(other, out, progress=False, overwrite=True)
    assert summary.ok and summary.counts["labeled"] == 1


def test_process_pool(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "POOL_MIN_SAMPLES", 0)  # a pool even for 8 samples
    root, splits, _, _ = make_voc(tmp_path)
    out = tmp_path / "shards"
    summary = prepare.run(
        prepare.voc_plan(root, "2", splits_dir=splits), out, shard_rows=1, workers=2,
        progress=False,
    )  # fmt: skip
    assert summary.ok and summary.shards_written == 8
    assert fmt.read_dataset_info(out)["counts"] == {"labeled": 2, "unlabeled": 4, "val": 2}


def test_digits_command_forwards_options(tmp_path, monkeypatch, capsys):
    calls = []

    def generate(out, **options):
        calls.append((out, options))
        return {"counts": {"labeled": 1, "unlabeled": 2, "val": 3}}

    fake = types.ModuleType("dssn.data.digits")
    fake.generate = generate
    monkeypatch.setitem(sys.modules, "dssn.data.digits", fake)
    import dssn.data

    monkeypatch.setattr(dssn.data, "digits", fake, raising=False)
    out = str(tmp_path / "d")
    assert main(["prepare", "digits", "--out", out, "--n-train", "40", "--seed", "3"]) == 0
    assert calls == [(out, {"n_train": 40, "seed": 3})]
    assert "val              3 rows" in capsys.readouterr().out

"""``predict_folder`` without Ray: output names and the progress line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dssn.config import Config
from dssn.data.format import default_palette
from dssn.model import build_model
from dssn.train.inference import output_stems, predict_folder


def test_outputs_keep_the_stem_unless_two_images_share_it():
    paths = [Path("x/a.png"), Path("x/a.jpg"), Path("x/b.jpeg")]
    assert output_stems(paths) == {paths[0]: "a.png", paths[1]: "a.jpg", paths[2]: "b"}
    nested = [Path("x/a.png"), Path("x/city1/a.png"), Path("x/city2/a.jpg")]  # under root x
    assert output_stems(nested, Path("x")) == {
        nested[0]: "a", nested[1]: "city1/a", nested[2]: "city2/a",
    }  # fmt: skip


def test_a_progress_line_names_the_count_and_the_rate(tmp_path, capsys):
    cfg = Config()
    cfg.model.backbone, cfg.model.width, cfg.model.num_classes = "tiny", 8, 3
    model = build_model(cfg.model).eval()
    images = []
    for i in range(3):
        images.append(tmp_path / f"s{i}.png")
        Image.fromarray(np.full((24, 32, 3), 40 * i, np.uint8)).save(images[-1])
    palette = np.array(default_palette(3), np.uint8)
    (tmp_path / "sub").mkdir()
    images[2] = images[2].rename(tmp_path / "sub" / "s0.png")  # the same stem, a subfolder
    out = tmp_path / "out"
    done = predict_folder(model, images, out, cfg, palette, progress_s=0.0, root=tmp_path)
    assert len(done.written) == 6 and done.skipped == []
    assert sorted(p.relative_to(out).as_posix() for p in done.written) == [
        "s0_mask.png", "s0_overlay.png", "s1_mask.png", "s1_overlay.png",
        "sub/s0_mask.png", "sub/s0_overlay.png",
    ]  # fmt: skip
    assert all(p.is_file() for p in done.written)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(",")[0] for line in lines] == ["predict: 1/3 images", "predict: 2/3 images"]
    assert lines[0].endswith("s left")  # the rate and the time left follow
    predict_folder(model, images[:1], tmp_path / "out", cfg, palette, progress_s=None)
    assert capsys.readouterr().out == ""


def test_progress_lines_pass_the_items_through(capsys):
    from dssn.train.inference import with_progress

    assert list(with_progress(iter("abc"), 3, "eval", every_s=0.0)) == ["a", "b", "c"]
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(",")[0] for line in lines] == ["eval: 1/3 images", "eval: 2/3 images"]
    assert list(with_progress(iter("abc"), 3, "eval", every_s=3600.0)) == ["a", "b", "c"]
    assert capsys.readouterr().out == ""  # not yet due


def test_images_are_a_folders_image_files_or_one_file(tmp_path):
    import pytest

    from dssn.train.inference import list_images

    (tmp_path / "sub").mkdir()
    for name in ("b.JPG", "a.png", "notes.txt", "sub/c.bmp"):
        (tmp_path / name).write_bytes(b"")
    assert list_images(tmp_path) == [tmp_path / "a.png", tmp_path / "b.JPG", tmp_path / "sub/c.bmp"]
    assert list_images(tmp_path / "a.png") == [tmp_path / "a.png"]
    with pytest.raises(FileNotFoundError, match="not an image folder or image file"):
        list_images(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        list_images(tmp_path / "empty")

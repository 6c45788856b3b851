"""Per-class IoU tables: percent with one decimal, '-' for classes without IoU, mIoU row."""

from __future__ import annotations

import pytest

from dssn.train.tables import (
    class_names_for,
    image_score,
    iou_rows,
    per_image_rows,
    to_csv,
    to_markdown,
    to_text,
)


def test_rows_text_markdown_csv():
    nan = float("nan")
    rows = iou_rows(["bg", "one"], {"student": [0.5, nan], "teacher": [0.25, 0.75]})
    assert rows == [
        ["class", "student", "teacher"],
        ["bg", "50.0", "25.0"],
        ["one", "-", "75.0"],
        ["mIoU", "50.0", "50.0"],  # the NaN class is left out of the student's mean
    ]
    assert to_markdown(rows).splitlines()[1] == "|---|---:|---:|"
    assert to_csv(rows).splitlines()[2] == "one,-,75.0"
    text = to_text(rows).splitlines()
    assert text[0].split() == ["class", "student", "teacher"] and set(text[1]) <= {"-", " "}


def test_column_length_must_match_classes():
    with pytest.raises(ValueError, match="3 values for 2 classes"):
        iou_rows(["a", "b"], {"x": [0.1, 0.2, 0.3]})


def test_class_names_fall_back_to_numbers():
    assert class_names_for(2, {"classes": ["bg", "fg"]}) == ["bg", "fg"]
    assert class_names_for(3, {"classes": ["bg", "fg"]}) == ["0", "1", "2"]
    assert class_names_for(2, None) == ["0", "1"]


def test_confusion_rows_and_the_largest_confusions():
    import torch

    from dssn.train.tables import confusion_rows, top_confusions

    names = ["bg", "a", "b"]
    matrix = torch.tensor([[90, 10, 0], [2, 6, 2], [0, 0, 0]])  # b: no pixels
    assert confusion_rows(names, matrix) == [
        ["truth \\ predicted", "bg", "a", "b"],
        ["bg", "90", "10", "0"],
        ["a", "2", "6", "2"],
        ["b", "0", "0", "0"],
    ]
    assert top_confusions(names, matrix) == [
        ("a", "bg", 0.2), ("a", "b", 0.2), ("bg", "a", 0.1),
    ]  # fmt: skip
    assert top_confusions(names, matrix, count=1) == [("a", "bg", 0.2)]
    assert top_confusions(names, torch.eye(3, dtype=torch.long)) == []


def test_confusion_plot_is_written(tmp_path):
    import torch
    from PIL import Image

    from dssn.train.tables import plot_confusion

    path = plot_confusion(["bg", "a"], torch.tensor([[5, 1], [0, 3]]), tmp_path / "c.png", "t")
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 300


def test_per_image_rows_put_the_worst_image_first_with_its_largest_confusion():
    import torch

    names = ["background", "cat", "dog"]
    perfect = torch.tensor([[50, 0, 0], [0, 10, 0], [0, 0, 0]])
    dog_as_cat = torch.tensor([[40, 0, 0], [0, 5, 0], [0, 15, 0]])
    nothing = torch.zeros(3, 3, dtype=torch.long)  # every pixel ignored: no score
    scores = [image_score(m) for m in (perfect, dog_as_cat, nothing)]
    assert scores[0] == (1.0, 1.0)
    assert scores[1][0] == pytest.approx((1.0 + 5 / 20 + 0.0) / 3)  # dog: 0 of its 15 pixels
    assert scores[1][1] == pytest.approx(45 / 60)
    rows = per_image_rows(["a", "b", "c"], scores, names, [perfect, dog_as_cat, nothing])
    assert rows == [
        ["id", "miou", "pixel_accuracy", "largest_confusion"],
        ["b", "41.7", "75.0", "dog as cat (15 px)"],
        ["a", "100.0", "100.0", ""],
        ["c", "-", "-", ""],  # no score: last
    ]

"""``dssn compare``: finished runs' per-class teacher IoU side by side (no Ray)."""

from __future__ import annotations

import csv
import json

import pytest

from dssn.cli import main
from dssn.config import Config, ConfigError
from dssn.train.compare import compare_rows, load_run, rarest_classes


def fake_run(tmp_path, name, ious, root, best=None):
    run = tmp_path / name
    run.mkdir(parents=True)
    cfg = Config()
    cfg.model.num_classes = len(ious)
    cfg.data.root = str(root)
    cfg.save(run / "config.yaml")
    metrics = {
        "teacher_iou": ious,
        "best_teacher_iou": best or ious,
        "iteration": 40,
        "best_epoch": 2,
        "best_teacher_miou": sum(best or ious) / len(ious),
        "final_teacher_miou": sum(ious) / len(ious),
    }
    (run / "summary.json").write_text(json.dumps(metrics))
    return run


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "shards"
    root.mkdir()
    info = {
        "name": "toy",
        "classes": ["background", "a", "b", "c"],
        "num_classes": 4,
        "ignore_index": 255,
        "counts": {"labeled": 1, "unlabeled": 1, "val": 1},
        "class_prior": [0.2, 0.7, 0.1],  # foreground only: c is the rarest, then a
        "format_version": 1,
    }
    (root / "dataset.json").write_text(json.dumps(info))
    return root


def test_rarest_classes_come_from_the_prior():
    assert rarest_classes({"class_prior": [0.2, 0.7, 0.1]}, 2) == [3, 1]
    assert rarest_classes({}) == [] and rarest_classes(None) == []


def test_rarest_classes_of_a_prepared_dataset_come_from_its_pixel_counts():
    pixels = [9000, 40, 0, 700, 15, 3000]  # class 2 is in no mask: no IoU to average
    assert rarest_classes({"class_pixels": pixels}) == [4, 1, 3]
    assert rarest_classes({"class_pixels": [900, 50]}) == []  # two classes: nothing to pick


def test_compare_rows_put_runs_side_by_side(tmp_path, dataset):
    a = fake_run(tmp_path, "dssn", [0.9, 0.5, 0.4, 0.2], dataset, best=[0.9, 0.6, 0.4, 0.3])
    b = fake_run(tmp_path, "supervised", [0.8, 0.3, 0.2, 0.0], dataset)
    rows = compare_rows({"dssn": load_run(a), "supervised": load_run(b)})
    assert rows[0] == ["class", "dssn", "supervised"]
    assert rows[1] == ["background", "90.0", "80.0"]
    assert rows[-2] == ["mIoU", "50.0", "32.5"]
    assert rows[-1] == ["rarest c, a, b", "36.7", "16.7"]
    best = compare_rows({"dssn": load_run(a)}, which="best")
    assert best[-2] == ["mIoU", "55.0"]


def test_cli_prints_and_writes(tmp_path, dataset, capsys):
    a = fake_run(tmp_path, "dssn", [0.9, 0.5, 0.4, 0.2], dataset)
    assert main(["compare", str(a), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and "dssn: 40 iterations" in out
    assert (tmp_path / "out" / "compare.md").read_text().startswith("| class | dssn |")


def test_unfinished_run_is_named(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(ConfigError, match="half: no summary.json"):
        load_run(tmp_path / "half")


def test_the_settings_that_differ_are_listed_under_the_table(tmp_path, dataset, capsys):
    from dssn.config import set_values

    a = fake_run(tmp_path, "dssn", [0.9, 0.5, 0.4, 0.2], dataset)
    b = fake_run(tmp_path, "threshold", [0.9, 0.4, 0.4, 0.1], dataset)
    c = fake_run(tmp_path, "sup-seed1", [0.8, 0.3, 0.2, 0.0], dataset)
    for run, values in ((b, {"dssn.selection": "threshold"}),
                        (c, {"method": "supervised", "train.seed": 1})):  # fmt: skip
        cfg = set_values(load_run(run)[1], {**values, "train.name": run.name})
        cfg.save(run / "config.yaml")
    out_dir = tmp_path / "out"
    assert main(["compare", str(a), str(b), str(c), "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "settings that differ (3):" in out
    rows = (out_dir / "compare-settings.csv").read_text().splitlines()
    assert rows[0] == "setting,dssn,threshold,sup-seed1"
    assert sorted(rows[1:]) == [
        "dssn.selection,dssn,threshold,dssn",
        "method,dssn,dssn,supervised",
        "train.seed,0,0,1",
    ]  # train.name differs too, but names where the run is kept, not how it trained
    again = fake_run(tmp_path / "elsewhere", "dssn", [0.9, 0.5, 0.4, 0.1], dataset)
    assert main(["compare", str(a), str(again)]) == 0  # two runs of one name: their paths
    out = capsys.readouterr().out
    assert "the runs trained with the same settings" in out
    assert f"{a}: 40 iterations" in out and f"{again}: 40 iterations" in out
    assert main(["compare", str(a), str(a)]) == 2
    assert "a run is named twice" in capsys.readouterr().err


def test_runs_of_one_recipe_with_other_seeds_are_summarised_over_seeds(tmp_path, dataset, capsys):
    """Two recipes (selection dssn / threshold), three and two seeds: a column each with the
    mean ± sample standard deviation of its runs; a recipe run once shows its value alone."""
    from dssn.config import set_values

    runs = []
    for name, selection, seed, ious in (
        ("dssn-s0", "dssn", 0, [0.9, 0.5, 0.4, 0.2]),
        ("thr-s0", "threshold", 0, [0.9, 0.4, 0.4, 0.1]),
        ("dssn-s1", "dssn", 1, [0.9, 0.6, 0.4, 0.3]),
        ("dssn-s2", "dssn", 2, [0.9, 0.7, 0.4, 0.4]),
        ("thr-s1", "threshold", 1, [0.9, 0.4, 0.4, 0.1]),
    ):
        run = fake_run(tmp_path, name, ious, dataset)
        values = {"dssn.selection": selection, "train.seed": seed, "data.seed": seed}
        set_values(load_run(run)[1], values).save(run / "config.yaml")
        runs.append(str(run))
    out_dir = tmp_path / "out"
    assert main(["compare", *runs, "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "repeats: each recipe's runs" in out
    assert (
        "dssn-s0 (n=3): dssn-s0, dssn-s1, dssn-s2" in out and "thr-s0 (n=2): thr-s0, thr-s1" in out
    )
    rows = list(csv.reader((out_dir / "compare-seeds.csv").open()))
    assert rows[0] == ["class", "dssn-s0 (n=3)", "thr-s0 (n=2)"]
    table = {row[0]: row[1:] for row in rows[1:]}
    assert table["a"] == ["60.0 ± 10.0", "40.0 ± 0.0"]  # 50, 60, 70 and 40, 40
    assert table["background"] == ["90.0 ± 0.0", "90.0 ± 0.0"]
    assert table["mIoU"] == ["55.0 ± 5.0", "45.0 ± 0.0"]  # 50, 55, 60 and 45, 45
    assert table["rarest c, a, b"][1] == "30.0 ± 0.0"  # (10 + 40 + 40) / 3, twice
    # paired by seed (0 and 1 ran both): threshold minus dssn, 45 - 50 and 45 - 55
    paired = list(csv.reader((out_dir / "compare-paired.csv").open()))
    assert paired[0][:5] == ["recipe", "against", "seeds", "mIoU difference", "mIoU ahead"]
    assert paired[1] == [
        "thr-s0",
        "dssn-s0",
        "0 1",
        "-7.5 ± 3.5",
        "0 of 2",
        "-10.0 ± 4.7",
        "0 of 2",
    ]
    assert "paired by train.seed: each recipe minus the first" in out
    # one run of a recipe: no spread to show, and no table when every recipe ran once
    assert main(["compare", runs[0], runs[1]]) == 0
    assert "repeats:" not in capsys.readouterr().out

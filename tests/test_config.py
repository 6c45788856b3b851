"""Typed config: errors name the key and the file; overrides; YAML round trip; the two
reference configs carry METHOD.md's values."""

from __future__ import annotations

from pathlib import Path

import pytest

from dssn.config import Config, ConfigError, load_config, set_values

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    path = write(tmp_path, "dssn:\n  temprature: 0.2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "dssn.temprature" in str(err.value) and str(path) in str(err.value)
    assert "temperature" in str(err.value)  # the suggestion


def test_unknown_section_is_an_error(tmp_path):
    path = write(tmp_path, "dssm:\n  ema: 0.99\n")
    with pytest.raises(ConfigError, match="unknown key 'dssm'"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("dssn:\n  temperature: hot\n", "dssn.temperature"),
        ("train:\n  epochs: 2.5\n", "train.epochs"),
        ("train:\n  channels_last: 1\n", "train.channels_last"),
        ("model:\n  aspp_rates: 6\n", "model.aspp_rates"),
        ("data:\n  eval_crop: big\n", "data.eval_crop"),
        ("dssn: 3\n", "dssn"),
    ],
)
def test_wrong_type_names_the_key_and_the_file(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"'{key}'" in str(err.value) and str(path) in str(err.value)


def test_int_widens_to_float_and_none_is_accepted_where_optional(tmp_path):
    cfg = load_config(write(tmp_path, "optim:\n  lr_multi: 1\ndata:\n  eval_crop: null\n"))
    assert cfg.optim.lr_multi == 1.0 and isinstance(cfg.optim.lr_multi, float)
    assert cfg.data.eval_crop is None


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("dssn:\n  selection: best\n", "dssn.selection"),
        ("dssn:\n  consistency: cosine\n", "dssn.consistency"),
        ("model:\n  backbone: vgg16\n", "model.backbone"),
        ("dssn:\n  ema: 1.0\n", "dssn.ema"),
        ("dssn:\n  temperature: 0.0\n", "dssn.temperature"),
        ("dssn:\n  burn_in_epochs: 4\ntrain:\n  epochs: 4\n", "dssn.burn_in_epochs"),
        ("dssn:\n  burn_in_epochs: -1\n", "dssn.burn_in_epochs"),
        ("data:\n  row_groups_per_task: 0\n", "data.row_groups_per_task"),
        ("data:\n  eval_scales: []\n", "data.eval_scales"),
        ("data:\n  eval_scales: [1.0, -0.5]\n", "data.eval_scales"),
        ("train:\n  accumulate: 0\n", "train.accumulate"),
    ],
)
def test_bad_choice_or_range_names_the_key(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"'{key}'" in str(err.value) and str(path) in str(err.value)


def test_bad_choice_lists_the_allowed_values(tmp_path):
    with pytest.raises(ConfigError, match=r"\['dssn', 'topk', 'threshold', 'none'\]"):
        load_config(write(tmp_path, "dssn:\n  selection: best\n"))


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "dssn: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_overrides_by_dotted_and_leaf_names(tmp_path):
    path = write(tmp_path, "dssn:\n  temperature: 0.5\n")
    cfg = load_config(
        path,
        overrides=[
            "dssn.temperature=0.2",  # dotted, over the file's value
            "epochs=3",  # leaf: train.epochs
            "selection=topk",
            "aspp_rates=[1, 2, 3]",  # YAML-parsed values
            "eval_crop=null",
        ],
    )
    assert cfg.dssn.temperature == 0.2
    assert cfg.train.epochs == 3
    assert cfg.dssn.selection == "topk"
    assert cfg.model.aspp_rates == [1, 2, 3]
    assert cfg.data.eval_crop is None
    # the file's other values and the defaults stay
    assert cfg.dssn.ema == Config().dssn.ema


def test_override_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="ambiguous") as err:
        load_config(None, overrides=["seed=1"])
    for path in ("data.seed", "train.seed", "tune.seed"):
        assert path in str(err.value)
    with pytest.raises(ConfigError, match="unknown key 'tempreture'"):
        load_config(None, overrides=["tempreture=0.1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, overrides=["temperature"])
    with pytest.raises(ConfigError, match="'dssn.temperature' must be a number"):
        load_config(None, overrides=["temperature=warm"])
    with pytest.raises(ConfigError, match="'train.seed'"):
        load_config(None, overrides=["train.seed=x"])


def test_set_values_for_the_tuner():
    cfg = set_values(Config(), {"temperature": 0.3, "optim.lr": 0.01})
    assert cfg.dssn.temperature == 0.3 and cfg.optim.lr == 0.01
    with pytest.raises(ConfigError, match="dssn.selection"):
        set_values(Config(), {"selection": "bogus"})


def test_yaml_round_trip(tmp_path):
    cfg = load_config(
        CONFIGS / "cityscapes_r101.yaml", overrides=["temperature=0.25", "aspp_rates=[3, 6, 9]"]
    )
    path = tmp_path / "resolved.yaml"
    cfg.save(path)
    again = load_config(path)
    assert again == cfg
    assert again.dssn.temperature == 0.25 and again.model.aspp_rates == [3, 6, 9]
    # and the saved text is a fixed point (a second trip writes the same YAML)
    again.save(tmp_path / "again.yaml")
    assert load_config(tmp_path / "again.yaml").to_yaml() == again.to_yaml()


def test_voc_reference_config_has_method_values():
    cfg = load_config(CONFIGS / "voc_r101.yaml")
    m, d, o, data, t = cfg.model, cfg.dssn, cfg.optim, cfg.data, cfg.train
    assert (m.backbone, m.num_classes, m.output_stride) == ("resnet101_deep", 21, 16)
    assert m.aspp_rates == [6, 12, 18] and m.dropout == 0.5
    assert m.pretrained == "pretrained/resnet101.pth"
    assert (data.crop_size, data.batch_size, data.eval_mode) == (513, 2, "original")
    assert data.scale_range == [0.5, 2.0]
    assert (data.cutmix_p, data.cutmix_area, data.cutmix_aspect) == (0.5, [0.02, 0.4], 0.3)
    assert data.mean == [0.485, 0.456, 0.406] and data.std == [0.229, 0.224, 0.225]
    assert (o.optimizer, o.lr, o.lr_multi, o.momentum) == ("sgd", 0.002, 10.0, 0.9)
    assert (o.weight_decay, o.poly_power) == (1e-4, 0.9)
    assert (t.epochs, t.workers, t.gpus_per_worker) == (100, 4, 1)
    assert (d.variant, d.labeled_loss, d.selection) == ("voc", "ce", "dssn")
    assert (d.select_ratio, d.select_floor) == (0.96, 0.92)
    assert (d.w_strong, d.w_fp, d.w_consistency) == (0.25, 0.25, 0.01)
    assert (d.consistency, d.consistency_outside_half, d.strong_warmup_epochs) == (
        "mse",
        False,
        0,
    )
    assert d.ema == 0.996


def test_cityscapes_reference_config_has_method_values():
    cfg = load_config(CONFIGS / "cityscapes_r101.yaml")
    m, d, o, data, t = cfg.model, cfg.dssn, cfg.optim, cfg.data, cfg.train
    assert (m.backbone, m.num_classes, m.output_stride) == ("resnet101_deep", 19, 16)
    assert (data.crop_size, data.batch_size) == (801, 1)
    assert (data.eval_mode, data.eval_crop, data.eval_stride) == ("sliding_window", None, 2 / 3)
    assert (o.lr, o.lr_multi, o.momentum, o.weight_decay) == (0.005, 1.0, 0.9, 1e-4)
    assert (t.epochs, t.workers, t.gpus_per_worker) == (240, 4, 1)
    assert d.variant == "cityscapes"
    assert (d.labeled_loss, d.ohem_thresh, d.ohem_min_kept) == ("ohem", 0.7, 100_000)
    assert d.selection == "none"
    assert (d.w_strong, d.w_fp, d.w_consistency) == (0.25, 0.25, 0.005)
    assert d.consistency_outside_half and d.strong_warmup_epochs == 5
    assert d.ema == 0.996


@pytest.mark.parametrize("name", ["voc_r101.yaml", "cityscapes_r101.yaml"])
def test_reference_configs_name_only_what_differs(name):
    # an experiment YAML names only values that differ from the defaults
    import yaml

    data = yaml.safe_load((CONFIGS / name).read_text())
    defaults = Config().to_dict()
    for section, values in data.items():
        if isinstance(values, dict):
            for key, value in values.items():
                assert defaults[section][key] != value, f"{name}: {section}.{key} is the default"
        else:
            assert defaults[section] != values, f"{name}: {section} is the default"

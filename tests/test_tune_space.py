"""The search space (dssn.tune.space) and the resource arithmetic of the tuner, without Ray."""

from __future__ import annotations

import numpy as np
import pytest

from dssn.cli import main
from dssn.config import Config, ConfigError, from_dict
from dssn.tune.space import (
    apply_params,
    asha_rungs,
    build_space,
    fixed_values,
    format_space,
    to_optuna,
    to_tune,
)
from dssn.tune.tuner import concurrent_trials, trial_demand


def cfg_with(**tune) -> Config:
    return from_dict({"tune": tune, "train": {"epochs": 8}})


def test_default_space_searches_the_five_knobs_and_fixes_what_they_need():
    cfg = cfg_with()
    space = build_space(cfg)
    assert list(space) == ["temperature", "topk_ratio", "w_strong", "w_fp", "w_consistency"]
    assert space["temperature"].path == "dssn.temperature"
    assert space["temperature"].kind == "loguniform"
    assert space["w_consistency"].kind == "loguniform"
    assert space["topk_ratio"].kind == "uniform"
    fixed = fixed_values(cfg)
    # topk_ratio acts only with top-k selection, temperature only with InfoNCE
    assert fixed["dssn.selection"][0] == "topk"
    assert fixed["dssn.consistency"][0] == "infonce"
    assert fixed["train.epochs"][0] == 8


def test_overrides_replace_add_fix_and_drop_parameters():
    cfg = cfg_with(
        space={
            "dssn.temperature": {"loguniform": [0.02, 1.0]},  # dotted path = same parameter
            "selection": {"choice": ["dssn", "topk"]},
            "w_fp": 0.5,  # fixed, not searched
            "w_strong": None,  # dropped: the config's value stays
        },
        extra=["lr", "ema"],
        max_epochs=3,
    )
    space = build_space(cfg)
    assert set(space) == {
        "temperature", "topk_ratio", "w_consistency", "selection", "lr", "ema",
    }  # fmt: skip
    assert space["temperature"].values == (0.02, 1.0)
    assert space["selection"].values == ("dssn", "topk")
    # lr is relative to the config's own lr (0.002): x0.25 .. x4
    assert space["lr"].values == pytest.approx((0.0005, 0.008))
    fixed = fixed_values(cfg)
    assert fixed["dssn.w_fp"][0] == 0.5
    assert "dssn.selection" not in fixed  # searched itself, so not fixed
    assert fixed["dssn.consistency"][0] == "infonce"
    assert fixed["train.epochs"][0] == 3
    # dropping both coupled parameters searches the reference method
    ref = cfg_with(space={"temperature": None, "topk_ratio": None})
    assert set(fixed_values(ref)) == {"train.epochs"}


@pytest.mark.parametrize(
    ("space", "extra", "message"),
    [
        ({"temperature": {"lognormal": [0.1, 1]}}, [], "tune.space.temperature"),
        ({"temperature": {"loguniform": [1.0, 0.1]}}, [], "below high"),
        ({"temperature": {"loguniform": [0.0, 1.0]}}, [], "positive"),
        ({"selection": {"choice": ["dssn", "best"]}}, [], "['best']"),
        ({"no_such_knob": {"uniform": [0, 1]}}, [], "no_such_knob"),
        ({}, ["momentumm"], "momentumm"),
    ],
)
def test_bad_specs_are_errors_naming_the_key(space, extra, message):
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        build_space(cfg_with(space=space, extra=extra))


def test_apply_params_sets_the_config_paths_and_accepts_numpy_draws():
    cfg = cfg_with()
    trial = apply_params(cfg, {"temperature": np.float64(0.25), "w_strong": 0.7})
    assert trial.dssn.temperature == 0.25 and isinstance(trial.dssn.temperature, float)
    assert trial.dssn.w_strong == 0.7
    assert trial.dssn.selection == "topk" and trial.dssn.consistency == "infonce"
    assert trial.train.epochs == 8
    assert trial.dssn.w_fp == cfg.dssn.w_fp  # not drawn: the config's value
    with pytest.raises(ConfigError, match="not in the search space"):
        apply_params(cfg, {"momentum": 0.5})


def test_tune_and_optuna_forms_match_the_space():
    import optuna
    from ray.tune.search.sample import Categorical, Float

    cfg = cfg_with(extra=["selection"])
    space = build_space(cfg)
    tune_space = to_tune(space)
    assert isinstance(tune_space["temperature"], Float)
    assert isinstance(tune_space["selection"], Categorical)
    assert tune_space["temperature"].lower == 0.03 and tune_space["temperature"].upper == 1.0
    dist = to_optuna(space)
    assert dist["temperature"] == optuna.distributions.FloatDistribution(0.03, 1.0, log=True)
    assert dist["topk_ratio"] == optuna.distributions.FloatDistribution(0.1, 0.9)


@pytest.mark.parametrize(("max_t", "grace", "rf"), [(2, 1, 2), (8, 1, 2), (9, 1, 3), (20, 2, 2)])
def test_printed_asha_rungs_are_the_ones_ray_uses(max_t, grace, rf):
    from ray.tune.schedulers.async_hyperband import _Bracket

    bracket = _Bracket(grace, max_t, rf, 0)
    ray_rungs = sorted(milestone for milestone, _ in bracket._rungs if milestone < max_t)
    assert asha_rungs(max_t, grace, rf) == ray_rungs


def test_format_space_lists_every_parameter_and_fixed_value():
    text = format_space(cfg_with(extra=["lr"]))
    for name in ("temperature", "topk_ratio", "w_strong", "w_fp", "w_consistency", "lr"):
        assert f"  {name} " in text
    assert "dssn.selection = topk" in text and "dssn.consistency = infonce" in text
    assert "stops at epochs [1, 3] unless in the top 1/3" in text  # max 8, grace 1, rf 3


def test_asha_never_compares_trials_during_the_burn_in():
    from dssn.tune.tuner import build_scheduler

    cfg = from_dict({"train": {"epochs": 9}, "dssn": {"burn_in_epochs": 2}})
    # epochs 1-2 are labeled-only: the searched DSSN terms have not acted yet
    assert build_scheduler(cfg)._brackets[0]._rungs[-1][0] == 3  # the first rung: epoch 3
    assert "stops at epochs [3] unless" in format_space(cfg)
    assert "grace 3 (past dssn.burn_in_epochs 2)" in format_space(cfg)
    later = from_dict(
        {"train": {"epochs": 9}, "dssn": {"burn_in_epochs": 2}, "tune": {"grace_period": 4}}
    )
    assert format_space(later).endswith("grace 4")  # already past the burn-in: as given
    supervised = from_dict(
        {"method": "supervised", "train": {"epochs": 9}, "dssn": {"burn_in_epochs": 2}}
    )
    assert "stops at epochs [1, 3] unless" in format_space(supervised)


def test_print_space_cli(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("train: {epochs: 4}\ntune: {extra: [ema]}\n")
    assert main(["tune", "--config", str(config), "--print-space", "--max-epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "ema" in out and "train.epochs = 2" in out


def test_concurrency_leaves_room_for_every_trials_data_pipeline():
    cfg = from_dict({"train": {"workers": 2, "cpus_per_worker": 1}, "tune": {"num_samples": 10}})
    cpus, gpus = trial_demand(cfg)
    assert (cpus, gpus) == (2 + 1 + 0.5, 0)  # workers + tune.data_cpus + tune.trial_cpus
    assert concurrent_trials(cfg, cluster_cpus=8, cluster_gpus=0) == 2  # 7 of 8 CPUs
    assert concurrent_trials(cfg, cluster_cpus=100, cluster_gpus=0) == 10  # num_samples caps
    gpu = from_dict({"train": {"workers": 4, "gpus_per_worker": 1}, "tune": {"num_samples": 10}})
    assert concurrent_trials(gpu, cluster_cpus=200, cluster_gpus=8) == 2  # GPUs limit
    with pytest.raises(ConfigError, match="max_concurrent_trials"):
        concurrent_trials(gpu, cluster_cpus=200, cluster_gpus=2)
    explicit = from_dict({"tune": {"num_samples": 4, "max_concurrent_trials": 3}})
    assert concurrent_trials(explicit, cluster_cpus=1, cluster_gpus=0) == 3

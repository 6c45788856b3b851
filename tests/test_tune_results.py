"""Result tables, plots and the best config (dssn.tune.results / plots), from a real Tune run.

The search here runs the real Tuner pieces (param space, seeded OptunaSearch, ASHA by epoch,
the experiment files) around a function that reports made-up mIoUs instead of training, so it
takes seconds; tests/test_tune_search.py runs the real TorchTrainer trials.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from dssn.cli import main
from dssn.config import from_dict, load_config
from dssn.tune import plots
from dssn.tune.results import load_experiment, summarize, trial_table
from dssn.tune.space import build_space, to_tune
from dssn.tune.tuner import (
    CONFIG_FILE,
    SEARCH_FILE,
    build_scheduler,
    build_searcher,
    experiment_name,
    experiment_path,
    search_metadata,
    trial_dirname,
)

pytestmark = pytest.mark.ray

EPOCHS = 4
SAMPLES = 6


def fake_trial(params):
    """mIoU grows with w_strong and with the epoch: trials are clearly ordered."""
    import ray.tune

    for epoch in range(1, EPOCHS + 1):
        teacher = params["w_strong"] * epoch / EPOCHS
        ray.tune.report({"epoch": epoch, "teacher_miou": teacher, "student_miou": 0.9 * teacher})


@pytest.fixture(scope="module")
def search(ray_instance, tmp_path_factory):
    """A 6-trial search, one trial at a time (so ASHA's decisions are deterministic)."""
    import sys

    from ray import cloudpickle, tune

    # the trial function lives in this test module, which Ray workers cannot import: ship it
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    storage = tmp_path_factory.mktemp("results")
    cfg = from_dict(
        {
            "name": "fake",
            "train": {"epochs": EPOCHS, "storage": str(storage)},
            "tune": {"num_samples": SAMPLES, "max_concurrent_trials": 1, "seed": 3},
        }
    )
    path = experiment_path(cfg)
    (storage / experiment_name(cfg)).mkdir()
    (storage / experiment_name(cfg) / CONFIG_FILE).write_text(cfg.to_yaml())
    meta = json.dumps(search_metadata(cfg, 1))
    (storage / experiment_name(cfg) / SEARCH_FILE).write_text(meta)
    tuner = tune.Tuner(
        tune.with_resources(fake_trial, {"cpu": 0.25}),
        param_space=to_tune(build_space(cfg)),
        tune_config=tune.TuneConfig(
            metric="teacher_miou",
            mode="max",
            search_alg=build_searcher(cfg),
            scheduler=build_scheduler(cfg),
            num_samples=SAMPLES,
            max_concurrent_trials=1,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(name=experiment_name(cfg), storage_path=str(storage)),
    )
    grid = tuner.fit()
    return cfg, path, grid


def test_table_has_one_row_per_trial_best_first(search):
    cfg, path, grid = search
    table = trial_table(load_experiment(path))
    assert len(table) == SAMPLES
    assert list(table["rank"]) == list(range(1, SAMPLES + 1))
    best = table["best_teacher_miou"].tolist()
    assert best == sorted(best, reverse=True)
    for name in build_space(cfg):
        assert name in table.columns
    # the table agrees with Tune's own record of every trial
    by_id = {r.metrics["trial_id"]: r for r in grid}
    for _, row in table.iterrows():
        result = by_id[row["trial"]]
        assert row["epochs"] == result.metrics["epoch"]
        assert row["final_teacher_miou"] == pytest.approx(100 * result.metrics["teacher_miou"])
        assert row["w_strong"] == pytest.approx(result.config["w_strong"])
        assert row["final_student_miou"] == pytest.approx(0.9 * row["final_teacher_miou"])
    # ASHA (rungs at epochs 1 and 3 of 4) stopped some trials; those ran fewer epochs
    stopped = table[table["stopped_early"]]
    assert len(stopped) >= 1
    assert (stopped["epochs"] < EPOCHS).all()
    assert (table.loc[~table["stopped_early"], "epochs"] == EPOCHS).all()
    assert (table["wall_s"] >= 0).all()  # made-up trials take ~no time; real ones: seconds


def test_summary_writes_tables_plots_and_a_trainable_best_config(search, tmp_path):
    cfg, path, _ = search
    out = tmp_path / "out"
    summary = summarize(path, out=str(out))
    for what in ("csv", "parquet", "markdown", "best_config", "curves", "params", "importance"):
        assert what in summary.paths, (what, summary.notes)
    csv = pd.read_csv(out / "trials.csv")
    parquet = pd.read_parquet(out / "trials.parquet")
    assert list(csv["trial"]) == list(parquet["trial"]) == list(summary.table["trial"])
    markdown = (out / "trials.md").read_text().splitlines()
    assert len(markdown) == 2 + SAMPLES and markdown[0].startswith("| rank | trial |")
    for png in ("curves.png", "params.png", "importance.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # the best config is the full resolved config of the best trial, ready for dssn train
    best = load_config(out / "best_config.yaml")
    top = summary.table.iloc[0]
    assert best.dssn.w_strong == pytest.approx(top["w_strong"])
    assert best.dssn.temperature == pytest.approx(top["temperature"])
    assert best.dssn.selection == "topk" and best.dssn.consistency == "infonce"
    assert best.train.epochs == EPOCHS
    assert best.train.name == "fake-tune-best"  # not the trial's own run: no accidental resume
    raw = yaml.safe_load((out / "best_config.yaml").read_text())
    assert set(raw) == set(cfg.to_dict())  # every section written out
    # w_strong drives the made-up mIoU: fANOVA ranks it first
    assert "importances by Optuna fANOVA" in summary.notes


def test_results_cli_prints_the_table_and_where_things_are(search, capsys):
    _, path, _ = search
    assert main(["results", path, "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "best_teacher_miou" in out and "stopped_early" in out
    assert f"{path}/results/trials.csv" in out
    assert f"{path}/results/best_config.yaml" in out


def test_results_cli_on_a_missing_directory_is_a_clear_error(tmp_path, capsys):
    assert main(["results", str(tmp_path / "nothing")]) == 2
    assert "no such experiment directory" in capsys.readouterr().err


def test_importances_need_two_evaluated_trials_and_fall_back_to_a_forest(search):
    cfg, path, _ = search
    exp = load_experiment(path)
    table = trial_table(exp)
    values, why = plots.importances(exp.space, table.head(1), exp.metric)
    assert values is None and "at least 2" in why
    flat = table.assign(best_teacher_miou=50.0)  # no variance: Optuna's fANOVA refuses
    values, why = plots.importances(exp.space, flat, exp.metric)
    assert values is not None and set(values) == set(exp.space)
    assert why.startswith("random-forest")


def test_asha_relearns_its_rungs_from_disk_when_a_search_resumes(search):
    """After Tuner.restore the scheduler starts empty; the restored trials' reports (replayed
    by on_trial_add) let it stop a poor newcomer as it would have before the interruption."""
    from types import SimpleNamespace

    from ray.tune import ExperimentAnalysis
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    cfg, path, _ = search
    restored = ExperimentAnalysis(path).trials  # Trial objects as Tune restores them
    newcomer = SimpleNamespace(trial_id="newcomer", status="PENDING", storage=None)
    poor = {"epoch": 1, "teacher_miou": 0.0}
    decisions = {}
    for name, scheduler in (("resumable", build_scheduler(cfg)), ("plain", ASHAScheduler(
        time_attr="epoch", max_t=EPOCHS, grace_period=1, reduction_factor=2))):  # fmt: skip
        scheduler.set_search_properties("teacher_miou", "max")
        for trial in restored:
            scheduler.on_trial_add(None, trial)
        scheduler.on_trial_add(None, newcomer)
        decisions[name] = scheduler.on_trial_result(None, newcomer, poor)
    assert decisions == {"resumable": TrialScheduler.STOP, "plain": TrialScheduler.CONTINUE}


def report_through_ray_train(config):
    """A Tune function that reports the Ray Train way (Ray 2.60 refuses it inside Tune)."""
    import ray.train
    import ray.tune

    try:
        ray.train.report({"refused": 0})
        ray.tune.report({"refused": 0, "why": ""})
    except DeprecationWarning as e:
        ray.tune.report({"refused": 1, "why": str(e)})


def test_ray_train_report_is_refused_inside_a_tune_function(ray_instance, tmp_path):
    """Why trials report through TuneReportCallback and ray.tune.report (issue 5, item 7)."""
    import sys

    from ray import cloudpickle, tune

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    grid = tune.Tuner(
        tune.with_resources(report_through_ray_train, {"cpu": 0.25}),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="deprecated", verbose=0),
    ).fit()
    assert grid[0].metrics["refused"] == 1
    assert "use the equivalent `ray.tune` API" in grid[0].metrics["why"]


def test_a_search_stopped_before_it_ended_says_how_to_continue_it():
    import pandas as pd

    from dssn.tune.results import Experiment, Trial, unfinished_notes

    def trial(i, status):
        return Trial(f"t{i}", status, {}, pd.DataFrame())

    done = [trial(0, "TERMINATED"), trial(1, "ERROR")]
    exp = Experiment("/runs/digits-tune", done, {}, meta={"num_samples": 2})
    assert unfinished_notes(exp) == []  # every planned trial ended (one of them failed)
    for trials, planned in ((done + [trial(2, "RUNNING")], 3), (done, 4)):
        exp = Experiment("/runs/digits-tune", trials, {}, meta={"num_samples": planned})
        (note,) = unfinished_notes(exp)
        assert note.startswith(f"the search stopped before it ended: 2 of {planned} trials")
        assert (
            "`dssn tune --config /runs/digits-tune/config.yaml --storage /runs --name digits-tune "
            "--resume` continues it" in note
        )

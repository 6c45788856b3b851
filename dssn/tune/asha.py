"""ASHA that survives ``dssn tune --resume``.

Ray Tune keeps the scheduler only as it was constructed (in ``tuner.pkl``), so after
``Tuner.restore`` plain ASHA has empty rungs and compares the remaining trials with each other
only. Tune re-adds every restored trial through ``on_trial_add``; here their reports on disk
(``result.json``) are replayed into the rungs. The decisions those reports led to were taken
before the interruption and are not repeated.
"""

from __future__ import annotations

import json
from typing import Any

from ray.tune.schedulers import ASHAScheduler

RESULT_FILE = "result.json"  # Tune's log of a trial's reports, one JSON object a line
TERMINATED = "TERMINATED"


class ResumableASHA(ASHAScheduler):
    """``ASHAScheduler`` whose rungs hold the results of trials restored from disk."""

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)
        bracket = self._trial_info[trial.trial_id]
        for result in past_results(trial):
            if self._time_attr in result and self._metric in result:
                score = self._metric_op * result[self._metric]
                bracket.on_result(trial, result[self._time_attr], score)
        if trial.status == TERMINATED:  # it reports nothing more
            del self._trial_info[trial.trial_id]


def past_results(trial: Any) -> list[dict[str, Any]]:
    """The results a trial reported before (its ``result.json``), oldest first; [] if none."""
    return [json.loads(line) for line in read_trial_file(trial, RESULT_FILE).splitlines() if line]


def read_trial_file(trial: Any, name: str) -> str:
    """A file of the trial's directory on the experiment storage (local or a URI); "" if none."""
    import pyarrow.fs as pafs

    storage = getattr(trial, "storage", None)
    try:
        fs, path = storage.storage_filesystem, f"{storage.trial_fs_path}/{name}"
    except (AttributeError, RuntimeError):  # a new trial: no directory named yet
        return ""
    if fs.get_file_info(path).type != pafs.FileType.File:
        return ""
    with fs.open_input_stream(path) as f:
        return f.read().decode()

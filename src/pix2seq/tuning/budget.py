"""When a worker stops: the study's trial budget, counted over every worker."""

from __future__ import annotations

import logging
import time
import warnings

import optuna
from optuna.trial import TrialState

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_FAILURES = 3  # a worker stops after this many failed trials in a row
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # the trials that count toward tune.n_trials


def counts(study: optuna.Study) -> dict[str, int]:
    out = {s.name: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] += 1
    return out


def _fail_stale(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


class StudyBudget:
    """Stop when the study (all workers) has ``n_trials`` COMPLETE + PRUNED trials.

    FAIL trials do not count (they are replaced), but a worker whose last
    ``max_consecutive_failures`` trials all failed stops: something is broken, not unlucky.

    Live trials of other workers count too, so two workers finish exactly ``n_trials`` rather than
    overshooting. When only those live trials stand between the study and its budget, the worker
    waits (polling, failing stale trials) instead of leaving: if one of them dies, its retry is run
    here. Without heartbeats a RUNNING trial may belong to a dead worker, so they are not counted.
    """

    def __init__(
        self,
        n_trials: int,
        heartbeat: bool,
        deadline: float | None,
        poll_s: float = 5.0,
        max_consecutive_failures: int = MAX_CONSECUTIVE_FAILURES,
    ) -> None:
        self.n_trials = n_trials
        self.heartbeat = heartbeat
        self.deadline = deadline
        self.poll_s = poll_s
        self.max_consecutive_failures = max_consecutive_failures
        self.failures = 0

    def should_continue(self, study: optuna.Study) -> bool:
        while True:
            if self.heartbeat:
                _fail_stale(study)
            c = counts(study)
            done = c["COMPLETE"] + c["PRUNED"]
            if done >= self.n_trials:
                return False
            if self.deadline is not None and time.monotonic() >= self.deadline:
                return False
            if c["WAITING"] > 0 or not self.heartbeat or done + c["RUNNING"] < self.n_trials:
                return True
            log.info(
                "study %s: %d done, %d running elsewhere; waiting for them",
                study.study_name,
                done,
                c["RUNNING"],
            )
            time.sleep(self.poll_s)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.failures = self.failures + 1 if trial.state == TrialState.FAIL else 0
        if self.failures >= self.max_consecutive_failures:
            log.error(
                "study %s: %d trials in a row failed in this worker; stopping it (see the errors above)",
                study.study_name,
                self.failures,
            )
            study.stop()
        elif not self.should_continue(study):
            study.stop()

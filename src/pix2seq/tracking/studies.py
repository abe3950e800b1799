"""MLflow runs of a hyperparameter study: one parent run per study, one child run per trial.

Nothing here imports Optuna: :mod:`pix2seq.tuning` owns the study and passes plain values. A trial's
child run is normally the training run itself (``run_training`` nests it under the parent); these
helpers tag it with the trial's outcome, create one for a trial that died before starting its own,
and give the parent run the study's summary (best value and params, trial counts, plots, table).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pix2seq.tracking.runs import MAX_TAG_VALUE_LENGTH, log_params_once, param_str
from pix2seq.tracking.store import ensure_experiment, mlflow_client

ROLE_TAG = "optuna.role"
TRIAL_TAG = "optuna.trial_number"
STATE_TAG = "optuna.trial_state"
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}  # any other trial state: FAILED


def _tags(tags: Mapping[str, Any]) -> list[Any]:
    from mlflow.entities import RunTag

    return [RunTag(str(k), str(v)[:MAX_TAG_VALUE_LENGTH]) for k, v in tags.items()]


def create_study_run(experiment: str, study_name: str) -> str:
    """A new parent run ``study-<name>`` tagged as a study; returns its id."""
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    name = f"study-{study_name}"
    run = mlflow_client().create_run(
        ensure_experiment(experiment),
        run_name=name,
        tags={MLFLOW_RUN_NAME: name, "optuna.study_name": study_name, ROLE_TAG: "study"},
    )
    return run.info.run_id


def usable_run(run_id: str | None) -> bool:
    """The run exists in this store and is not deleted."""
    if not run_id:
        return False
    try:
        return mlflow_client().get_run(run_id).info.lifecycle_stage != "deleted"
    except Exception:  # noqa: BLE001 - another store, or deleted for good
        return False


def reopen_run(run_id: str) -> None:
    mlflow_client().update_run(run_id, status="RUNNING")


def delete_run(run_id: str) -> None:
    mlflow_client().delete_run(run_id)


def end_run(run_id: str, status: str) -> None:
    mlflow_client().set_terminated(run_id, status=status)


def log_study_params(run_id: str, params: Mapping[str, Any]) -> None:
    log_params_once(mlflow_client(), run_id, params)


def record_trial(
    experiment: str,
    parent: str,
    run_id: str | None,
    *,
    run_name: str,
    number: int,
    state: str,
    tags: Mapping[str, str],
    params: Mapping[str, Any],
    evals: Sequence[float] = (),
) -> None:
    """Tag the trial's child run with its final ``state`` (and ``tags``). A trial without a run (its
    training died before starting one) gets one here: ``params`` and the reported AP values as its
    ``val/AP`` curve, ended with the MLflow status matching the trial's state."""
    from mlflow.entities import Metric, Param
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    client = mlflow_client()
    all_tags = {TRIAL_TAG: str(number), STATE_TAG: state, **tags}
    if run_id is None:
        run = client.create_run(
            ensure_experiment(experiment),
            run_name=run_name,
            tags={MLFLOW_PARENT_RUN_ID: parent, MLFLOW_RUN_NAME: run_name},
        )
        run_id = run.info.run_id
        items = [Param(k, param_str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            client.log_batch(run_id, params=items[i : i + 100])
        ts = int(time.time() * 1000)
        if evals:
            client.log_batch(run_id, metrics=[Metric("val/AP", v, ts, i) for i, v in enumerate(evals, 1)])
        client.set_terminated(run_id, status=RUN_STATUS.get(state, "FAILED"))
    client.log_batch(run_id, tags=_tags(all_tags))


def mark_trial_failed(parent: str, number: int, reason: str) -> None:
    """The child runs of trial ``number`` (its worker died): tagged FAIL with ``reason``, ended FAILED."""
    client = mlflow_client()
    exp = client.get_run(parent).info.experiment_id
    runs = client.search_runs(
        [exp], filter_string=f"tags.mlflow.parentRunId = '{parent}' and tags.`{TRIAL_TAG}` = '{number}'"
    )
    for r in runs:
        client.log_batch(r.info.run_id, tags=_tags({STATE_TAG: "FAIL", "optuna.fail_reason": reason}))
        if r.info.status == "RUNNING":
            client.set_terminated(r.info.run_id, status="FAILED")


def log_study_summary(
    parent: str,
    step: int,
    metrics: Mapping[str, float],
    tags: Mapping[str, Any],
    files: Iterable[Path] = (),
    plots: Iterable[Path] = (),
) -> None:
    """The study's state on its parent run: ``study/<name>`` metrics at ``step`` (trials done), tags,
    files at the run's root and plots under ``plots/``."""
    from mlflow.entities import Metric

    client = mlflow_client()
    ts = int(time.time() * 1000)
    items = [Metric(f"study/{k}", float(v), ts, step) for k, v in metrics.items()]
    client.log_batch(parent, metrics=items, tags=_tags(tags))
    for f in files:
        client.log_artifact(parent, str(f))
    for p in plots:
        client.log_artifact(parent, str(p), "plots")

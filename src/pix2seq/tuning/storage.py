"""Where a study lives: an Optuna RDB storage (SQLite, PostgreSQL, any SQLAlchemy URL), with
heartbeats so that a dead worker's trial is failed and retried by the others."""

from __future__ import annotations

import importlib.util
import logging
import re
import time
import warnings
from typing import Any

import optuna

from pix2seq.tracking import studies
from pix2seq.tracking.store import sqlite_path

log = logging.getLogger(__name__)

DEFAULT_MAX_RETRY = 3
PARENT_RUN_ATTR = "mlflow_parent_run_id"  # study user attribute: the study's MLflow parent run


def storage_url(url: str) -> str:
    """``url`` with a driver SQLAlchemy can load: ``postgres://`` / ``postgresql://`` name the installed
    driver (SQLAlchemy 2.1 defaults to psycopg 3; the project ships psycopg2-binary)."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("postgres", "postgresql"):
        if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
            return f"postgresql+psycopg2://{rest}"
        return f"postgresql://{rest}"
    return url


def mask_url(url: str) -> str:
    """The URL without its password (safe to log)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


class RetryStaleTrial:
    """Re-queue a trial whose worker died (heartbeat stale) and mark its MLflow run FAILED."""

    def __init__(self, max_retry: int | None = DEFAULT_MAX_RETRY) -> None:
        with warnings.catch_warnings():  # "experimental" since Optuna 2.8, pinned in uv.lock
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        log.warning(
            "trial %d of study %s lost its worker (no heartbeat): FAIL; retrying its params %s",
            trial.number,
            study.study_name,
            trial.params,
        )
        self.retry(study, trial)
        parent = study.user_attrs.get(PARENT_RUN_ATTR)
        if parent:
            try:
                studies.mark_trial_failed(
                    parent, trial.number, "worker lost (heartbeat stale); trial retried"
                )
            except Exception as e:  # noqa: BLE001 - bookkeeping must not stop the study
                log.warning("MLflow bookkeeping failed (%s: %s); the study goes on", type(e).__name__, e)


def retried_from(study: optuna.Study, number: int) -> int | None:
    """The number of the trial that trial ``number`` retries (its worker died), else None."""
    for t in study.get_trials(deepcopy=False):
        if t.number == number:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t)
    return None


def make_storage(
    url: str,
    heartbeat_s: int = 60,
    grace_period_s: int | None = None,
    max_retry: int | None = DEFAULT_MAX_RETRY,
    attempts: int = 5,
) -> optuna.storages.RDBStorage:
    """An RDB storage on ``url`` (``sqlite:///optuna.db``, ``postgresql://user@host/db``, ...).

    ``heartbeat_s > 0``: running trials beat every ``heartbeat_s`` seconds; one silent for
    ``grace_period_s`` (default ``2 * heartbeat_s``) is failed and retried (``max_retry`` times).
    SQLite gets a long lock timeout (several local workers); creating the schema is retried because
    workers that start together race to create the tables.
    """
    url = storage_url(url)
    engine_kwargs: dict[str, Any] = {}
    db = sqlite_path(url)
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 120}
        if db is not None:
            db.expanduser().parent.mkdir(parents=True, exist_ok=True)
    else:
        engine_kwargs["pool_pre_ping"] = True
    kwargs: dict[str, Any] = {}
    if heartbeat_s and heartbeat_s > 0:
        kwargs = {
            "heartbeat_interval": int(heartbeat_s),
            "grace_period": int(grace_period_s) if grace_period_s else 2 * int(heartbeat_s),
            "heartbeat_stale_trial_callback": RetryStaleTrial(max_retry),
        }
    last: Exception | None = None
    for i in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
        except Exception as e:  # noqa: BLE001 - concurrent schema creation; retried, then raised
            last = e
            log.warning("storage %s not ready (%s); retrying", mask_url(url), type(e).__name__)
            time.sleep(0.5 + i)
    assert last is not None
    raise last

"""Optuna study over the learning rate and batch repetition, tracked in MLflow (spec section 4).

One study (``tune.study_name``) lives in an Optuna RDB storage (``tune.storage``: SQLite by default,
any SQLAlchemy URL, e.g. PostgreSQL, so that workers on many machines share it). Every worker runs::

    summary = run_study(cfg)          # pipeline/tune.py; `make tune`, `make tune-worker STORAGE=...`

and the workers together finish ``tune.n_trials`` trials (COMPLETE + PRUNED, counted over the whole
study, so a stopped study resumes where it stopped). A trial is one :func:`pix2seq.training.run_training`
on a budget (``tune.trial_minutes`` wall clock, else ``tune.trial_epochs``, else the ``train`` section);
its objective is the validation AP of the final evaluation. Every evaluation reports AP to the pruner
(step = the evaluation's ordinal 1, 2, ... so trials of different batch repetition compare at the same
point of their budget) and stops the run when the pruner says so.

Failures:
    * an exception in a trial records it FAIL and the study goes on (``KeyboardInterrupt`` stops it);
    * a diverged trial (``NonFiniteLossError``: NaN/inf loss) is recorded PRUNED, not FAIL: divergence
      is what those hyperparameters do, and the sampler must learn it (TPE ignores FAIL trials);
    * a worker that dies (SIGKILL, lost machine) stops its trial's heartbeat: after the grace period
      another worker marks the trial FAIL and re-queues its parameters (``RetryHeartbeatStaleTrialCallback``,
      ``max_retry`` times); the retried trial's ``system_attrs["failed_trial"]`` names the original.

Several processes per trial (torchrun, one per GPU): rank 0 owns the study; before each trial it
broadcasts the trial's config to every rank (:func:`pix2seq.distributed.broadcast_object`), all ranks
train together, rank 0's pruning decision reaches the others through ``distributed.agree`` inside
``run_training``; a ``None`` broadcast ends the other ranks' loop.

MLflow: one parent run per study (its id kept in the study's user attribute ``mlflow_parent_run_id``),
every trial a child run (tags ``optuna.trial_number``, ``optuna.trial_state``); the parent gets the best
params and value, the history / parallel-coordinate / importance / intermediate-value plots, the trial
table and ``best_params.json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from pix2seq import distributed as dist
from pix2seq.config import Config, TuneConfig, atomic_write_text, config_from_dict

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from pix2seq.training import TrainHooks, TrainResult

log = logging.getLogger(__name__)

__all__ = [
    "LR_PARAM",
    "PARENT_RUN_ATTR",
    "REPEAT_PARAM",
    "StudySummary",
    "TrialSeededTPESampler",
    "best_overrides",
    "make_pruner",
    "make_sampler",
    "make_storage",
    "open_study",
    "read_best_params",
    "run_study",
    "search_space",
    "storage_url",
    "suggest_params",
    "trial_config",
    "trial_output_dir",
]

LR_PARAM = "train.lr"  # Optuna parameter names are the config keys they set
REPEAT_PARAM = "train.batch_repeat"
PARENT_RUN_ATTR = "mlflow_parent_run_id"  # study user attribute: the study's MLflow parent run
EVALS_PER_TRIAL = 4  # when the train section would evaluate less than twice, a trial evaluates ~4 times
DEFAULT_MAX_RETRY = 3
MAX_CONSECUTIVE_FAILURES = 3  # a worker stops after this many failed trials in a row
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # the trials that count toward tune.n_trials

TrainFn = Callable[[Config, "TrainHooks"], "TrainResult"]


# ------------------------------------------------------------------------------ search space


def search_space(tcfg: TuneConfig) -> dict[str, dict[str, Any]]:
    """The space as plain data (logged on the study's MLflow run)."""
    return {
        LR_PARAM: {"type": "float", "log": True, "low": tcfg.lr_min, "high": tcfg.lr_max},
        REPEAT_PARAM: {"type": "int", "low": tcfg.repeat_min, "high": tcfg.repeat_max},
    }


def suggest_params(trial: optuna.Trial, tcfg: TuneConfig) -> dict[str, Any]:
    """``{"train.lr": log-uniform in [lr_min, lr_max], "train.batch_repeat": int in [repeat_min, repeat_max]}``."""
    return {
        LR_PARAM: trial.suggest_float(LR_PARAM, tcfg.lr_min, tcfg.lr_max, log=True),
        REPEAT_PARAM: trial.suggest_int(REPEAT_PARAM, tcfg.repeat_min, tcfg.repeat_max),
    }


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "study"


def trial_output_dir(runs_dir: str | os.PathLike[str], study_name: str, number: int) -> Path:
    """``<runs_dir>/<study>/trial-<n>``: every trial its own checkpoints and run id."""
    return Path(runs_dir) / _safe_name(study_name) / f"trial-{number}"


def trial_config(cfg: Config, params: dict[str, Any], output_dir: str | os.PathLike[str]) -> Config:
    """``cfg`` with the trial's parameters, its output dir and the trial budget applied (validated).

    Budget: ``tune.trial_minutes > 0`` sets ``train.max_minutes`` (``train.epochs``, or
    ``tune.trial_epochs`` when set, stays an upper bound); else ``tune.trial_epochs > 0`` sets
    ``train.epochs`` (no wall-clock limit); else the ``train`` section's budget is used as is.
    The pruner needs intermediate evaluations: when the evaluation period would give fewer than two
    evaluations within the budget, it is lowered to a quarter of the budget. A trial never resumes
    another run's checkpoints (``train.resume: never``) and never registers a model.
    """
    d = cfg.to_dict()
    tr, tu = d["train"], cfg.tune
    tr["lr"] = float(params[LR_PARAM])
    tr["batch_repeat"] = int(params[REPEAT_PARAM])
    tr["output_dir"] = str(output_dir)
    tr["resume"] = "never"
    if tu.trial_minutes > 0:
        tr["max_minutes"] = float(tu.trial_minutes)
        if tu.trial_epochs > 0:
            tr["epochs"] = int(tu.trial_epochs)
    elif tu.trial_epochs > 0:
        tr["epochs"] = int(tu.trial_epochs)
        tr["max_minutes"] = 0.0
    if tr["max_minutes"] > 0:
        if tr["eval_every_minutes"] <= 0 or tr["eval_every_minutes"] > tr["max_minutes"] / 2:
            tr["eval_every_minutes"] = tr["max_minutes"] / EVALS_PER_TRIAL
    elif tr["eval_every_epochs"] <= 0 or tr["eval_every_epochs"] > tr["epochs"] / 2:
        tr["eval_every_epochs"] = max(1, tr["epochs"] // EVALS_PER_TRIAL)
    return config_from_dict(d)


# ----------------------------------------------------------------------- sampler, pruner, storage


class TrialSeededTPESampler(optuna.samplers.TPESampler):
    """TPE whose random draws for trial ``n`` come from ``seed + n``.

    Plain ``TPESampler(seed=s)`` in two workers draws the same random start-up points twice (each
    worker has the same generator). Seeding per trial number keeps one worker's study reproducible
    and gives concurrent workers different proposals. ``constant_liar`` keeps concurrent TPE
    proposals apart after the start-up phase.
    """

    def __init__(self, seed: int, **kwargs: Any) -> None:
        kwargs.setdefault("constant_liar", True)
        super().__init__(seed=seed, **kwargs)
        self._base_seed = int(seed)

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        s = (self._base_seed * 1_000_003 + trial.number * 7919) % (2**32)
        # private in Optuna 4/5 (pinned in uv.lock); without them TPE keeps its single stream
        rng, rand = getattr(self, "_rng", None), getattr(self, "_random_sampler", None)
        if rng is not None and hasattr(rng, "rng"):
            rng.rng.seed(s)
        if rand is not None and hasattr(getattr(rand, "_rng", None), "rng"):
            rand._rng.rng.seed((s + 1) % (2**32))
        super().before_trial(study, trial)


def make_sampler(tcfg: TuneConfig) -> optuna.samplers.BaseSampler:
    """Seeded TPE (``tune.sampler_seed``); at most half the trials (<= 10) are random start-up trials."""
    startup = min(10, max(1, tcfg.n_trials // 2))
    return TrialSeededTPESampler(seed=tcfg.sampler_seed, n_startup_trials=startup)


def make_pruner(tcfg: TuneConfig) -> optuna.pruners.BasePruner:
    """``tune.pruner``: median (after min(5, n_trials/4) trials), Hyperband, or none."""
    if tcfg.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=min(5, max(1, tcfg.n_trials // 4)), n_warmup_steps=0
        )
    if tcfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto", reduction_factor=3)
    return optuna.pruners.NopPruner()


def _describe(obj: Any) -> str:
    if isinstance(obj, optuna.pruners.MedianPruner):
        return (
            f"MedianPruner(n_startup_trials={obj._n_startup_trials}, n_warmup_steps={obj._n_warmup_steps})"
            if hasattr(obj, "_n_startup_trials")
            else "MedianPruner"
        )
    if isinstance(obj, optuna.samplers.TPESampler):
        seed = getattr(obj, "_base_seed", None)
        startup = getattr(obj, "_n_startup_trials", "?")
        return f"{type(obj).__name__}(seed={seed}, n_startup_trials={startup})"
    return type(obj).__name__


def _retry_callback(max_retry: int | None) -> Any:
    cls = (
        getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
        or optuna.storages.RetryFailedTrialCallback
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return cls(max_retry=max_retry)


class RetryStaleTrial:
    """Re-queue a trial whose worker died (heartbeat stale) and mark its MLflow run FAILED."""

    def __init__(self, max_retry: int | None = DEFAULT_MAX_RETRY) -> None:
        self.max_retry = max_retry
        self._retry = _retry_callback(max_retry)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        log.warning(
            "trial %d of study %s lost its worker (no heartbeat): FAIL; retrying its params %s",
            trial.number,
            study.study_name,
            trial.params,
        )
        self._retry(study, trial)
        _quietly(_mark_stale_run, study, trial)


def storage_url(url: str) -> str:
    """``url`` with a driver SQLAlchemy can load: ``postgres://`` / ``postgresql://`` name the installed
    driver (SQLAlchemy 2.1 defaults to psycopg 3; the project ships psycopg2-binary)."""
    import importlib.util

    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("postgres", "postgresql"):
        if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
            return f"postgresql+psycopg2://{rest}"
        return f"postgresql://{rest}"
    return url


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
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 120}
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if path and path != ":memory:":
            Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    else:
        engine_kwargs["pool_pre_ping"] = True
    kwargs: dict[str, Any] = {}
    if heartbeat_s and heartbeat_s > 0:
        grace = int(grace_period_s) if grace_period_s else 2 * int(heartbeat_s)
        kwargs = {"heartbeat_interval": int(heartbeat_s), "grace_period": grace}
        callback = RetryStaleTrial(max_retry)
        import inspect

        params = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
        kwargs[
            "heartbeat_stale_trial_callback"
            if "heartbeat_stale_trial_callback" in params
            else "failed_trial_callback"
        ] = callback
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


def mask_url(url: str) -> str:
    """The URL without its password (safe to log)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def open_study(
    name: str,
    storage: optuna.storages.BaseStorage | str,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
) -> tuple[optuna.Study, bool]:
    """Create the (maximising) study or load it if it exists; ``(study, created_by_this_call)``.

    Creation is atomic (the study name is unique in the storage), so exactly one of several workers
    starting together is the creator.
    """
    try:
        study = optuna.create_study(
            study_name=name,
            storage=storage,
            sampler=sampler,
            pruner=pruner,
            direction="maximize",
            load_if_exists=False,
        )
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
        if study.direction != optuna.study.StudyDirection.MAXIMIZE:
            raise ValueError(
                f"study {name!r} exists and does not maximise; choose another tune.study_name"
            ) from None
        return study, False


# ------------------------------------------------------------------------------------ budget


def _counts(study: optuna.Study) -> dict[str, int]:
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
            c = _counts(study)
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


# ------------------------------------------------------------------------------------ MLflow


def _quietly(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The study's own MLflow bookkeeping must not fail a trial or the study."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        log.warning("MLflow bookkeeping failed (%s: %s); the study goes on", type(e).__name__, e)
        return None


def _client() -> MlflowClient:
    from mlflow.tracking import MlflowClient

    from pix2seq.tracking import default_tracking_uri

    return MlflowClient(tracking_uri=default_tracking_uri())


def _experiment_id(cfg: Config) -> str:
    from pix2seq.tracking import RunTracker, default_tracking_uri

    # the experiment exactly as run_training's RunTracker creates it (artifact location beside the db)
    return RunTracker(cfg, tracking_uri=default_tracking_uri())._experiment_id()


def _log_new_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    """Params are immutable: log the new ones, record changed ones as ``param_changed.<key>`` tags."""
    from mlflow.entities import Param, RunTag

    existing = client.get_run(run_id).data.params
    new, changed = [], []
    for k, v in params.items():
        s = v if isinstance(v, str) else json.dumps(v) if isinstance(v, dict | list) else str(v)
        if k not in existing:
            new.append(Param(k, s[:6000]))
        elif existing[k] != s:
            changed.append(RunTag(f"param_changed.{k}", f"{existing[k]} -> {s}"[:8000]))
    if new or changed:
        client.log_batch(run_id, params=new, tags=changed)


def _study_params(
    cfg: Config, sampler: Any, pruner: Any, grace: int | None, max_retry: int | None
) -> dict[str, Any]:
    tu = cfg.tune
    return {
        "study_name": tu.study_name,
        "storage": mask_url(tu.storage),
        "direction": "maximize",
        "objective": "AP (validation, final evaluation of the trial)",
        "sampler": _describe(sampler),
        "sampler_seed": tu.sampler_seed,
        "pruner": _describe(pruner),
        "search_space": search_space(tu),
        "n_trials": tu.n_trials,
        "timeout_minutes": tu.timeout_minutes,
        "trial_minutes": tu.trial_minutes,
        "trial_epochs": tu.trial_epochs,
        "heartbeat_s": tu.heartbeat_s,
        "grace_period_s": grace,
        "max_retry": max_retry,
    }


def _parent_run(
    study: optuna.Study, created: bool, cfg: Config, params: dict[str, Any], wait_s: float = 60.0
) -> str:
    """The study's MLflow parent run: created by the study's creator, found by the other workers."""
    client = _client()

    def usable(rid: str | None) -> bool:
        if not rid:
            return False
        try:
            return client.get_run(rid).info.lifecycle_stage != "deleted"
        except Exception:  # noqa: BLE001 - another store, or deleted for good
            return False

    rid = None
    if not created:
        deadline = time.monotonic() + wait_s
        while True:  # a study without trials may have a creator that is still creating its run
            rid = study.user_attrs.get(PARENT_RUN_ATTR)
            if rid or study.get_trials(deepcopy=False) or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
        if rid and not usable(rid):
            log.warning(
                "the study's MLflow run %s is not in this tracking store; starting a new parent run", rid
            )
            rid = None
    if rid is None:
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

        run = client.create_run(
            _experiment_id(cfg),
            run_name=f"study-{study.study_name}",
            tags={
                MLFLOW_RUN_NAME: f"study-{study.study_name}",
                "optuna.study_name": study.study_name,
                "optuna.role": "study",
            },
        )
        rid = run.info.run_id
        study.set_user_attr(PARENT_RUN_ATTR, rid)
        # workers that joined a creator-less study together: the last write wins, the others adopt it
        if not created:
            time.sleep(1.0)
            winner = study.user_attrs.get(PARENT_RUN_ATTR)
            if winner and winner != rid and usable(winner):
                client.delete_run(rid)
                rid = winner
    else:
        client.update_run(rid, status="RUNNING")
    _log_new_params(client, rid, params)
    return rid


def _trial_run_id(result_run_id: str | None, out: Path) -> str | None:
    """The trial's MLflow run: from its result, else the id run_training wrote when the run started."""
    if result_run_id:
        return result_run_id
    f = out / "mlflow_run_id"
    try:
        text = f.read_text().strip() if f.is_file() else ""
    except OSError:
        text = ""
    return text or None


def _retried_from(trial: optuna.Trial) -> int | None:
    """The number of the trial this one retries (its worker died), else None."""
    try:
        attrs = trial.storage.get_trial_system_attrs(trial._trial_id)
    except Exception:  # noqa: BLE001
        return None
    return attrs.get("failed_trial")


def _record_trial_run(
    cfg: Config,
    parent: str,
    run_id: str | None,
    number: int,
    state: str,
    evals: list[float],
    run_name: str,
    extra_tags: dict[str, str],
) -> None:
    """Tag the trial's child run with its final state.

    A train function that kept no run (it died before starting one, or a stand-in) gets one here,
    with the trial's config as params and the reported AP values as its AP curve.
    """
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    client = _client()
    tags = {
        "optuna.study_name": cfg.tune.study_name,
        "optuna.trial_number": str(number),
        "optuna.trial_state": state,
        **extra_tags,
    }
    if run_id is None:
        run = client.create_run(
            _experiment_id(cfg),
            run_name=run_name,
            tags={MLFLOW_PARENT_RUN_ID: parent, MLFLOW_RUN_NAME: run_name},
        )
        run_id = run.info.run_id
        flat = cfg.flat()
        items = [
            Param(k, (json.dumps(v) if isinstance(v, list | dict) else str(v))[:6000])
            for k, v in flat.items()
        ]
        for i in range(0, len(items), 100):
            client.log_batch(run_id, params=items[i : i + 100])
        ts = int(time.time() * 1000)
        if evals:
            client.log_batch(run_id, metrics=[Metric("AP", v, ts, i) for i, v in enumerate(evals, 1)])
        client.set_terminated(
            run_id, status={"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(state, "FAILED")
        )
    client.log_batch(run_id, tags=[RunTag(k, str(v)[:8000]) for k, v in tags.items()])


def _mark_stale_run(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    parent = study.user_attrs.get(PARENT_RUN_ATTR)
    if not parent:
        return
    client = _client()
    exp = client.get_run(parent).info.experiment_id
    runs = client.search_runs(
        [exp],
        filter_string=f"tags.mlflow.parentRunId = '{parent}' "
        f"and tags.`optuna.trial_number` = '{trial.number}'",
    )
    for r in runs:
        client.set_tag(r.info.run_id, "optuna.trial_state", "FAIL")
        client.set_tag(r.info.run_id, "optuna.fail_reason", "worker lost (heartbeat stale); trial retried")
        if r.info.status == "RUNNING":
            client.set_terminated(r.info.run_id, status="FAILED")


def _save_plots(study: optuna.Study, folder: Path) -> list[Path]:
    """PNG plots (matplotlib backend; Plotly is not a dependency). A plot that cannot be drawn is skipped."""
    import matplotlib

    if not os.environ.get("DISPLAY"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vm

    n_complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    plots: dict[str, Callable[[], Any]] = {
        "optimization_history": lambda: vm.plot_optimization_history(study),
        "intermediate_values": lambda: vm.plot_intermediate_values(study),
    }
    if n_complete >= 1:
        plots["parallel_coordinate"] = lambda: vm.plot_parallel_coordinate(
            study, params=[LR_PARAM, REPEAT_PARAM]
        )
    if n_complete >= 2:
        plots["param_importances"] = lambda: vm.plot_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
        )
    else:
        log.info("parameter importance needs >= 2 completed trials (%d); not plotted", n_complete)
    saved = []
    for name, draw in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = draw()
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(9, 5.5)
            path = folder / f"{name}.png"
            fig.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(fig)
            saved.append(path)
        except Exception as e:  # noqa: BLE001 - e.g. importance with one distinct value
            log.warning("plot %s skipped: %s: %s", name, type(e).__name__, e)
            plt.close("all")
    return saved


def _log_study_summary(
    study: optuna.Study, parent: str, best: dict[str, Any] | None, counts: dict[str, int], plots: bool = True
) -> None:
    from mlflow.entities import Metric, RunTag

    client = _client()
    ts = int(time.time() * 1000)
    done = counts["COMPLETE"] + counts["PRUNED"]
    metrics = [Metric(f"trials_{k.lower()}", float(v), ts, done) for k, v in counts.items() if k != "WAITING"]
    tags = []
    if best is not None:
        metrics.append(Metric("best_AP", float(best["AP"]), ts, done))
        tags = [RunTag(f"best.{k}", str(best[k])) for k in (LR_PARAM, REPEAT_PARAM, "trial")]
    client.log_batch(parent, metrics=metrics, tags=tags)
    with tempfile.TemporaryDirectory(prefix="pix2seq-tune-") as tmp:
        folder = Path(tmp)
        for p in _save_plots(study, folder) if plots else []:
            client.log_artifact(parent, str(p), "plots")
        if best is not None:
            atomic_write_text(folder / "best_params.json", json.dumps(best, indent=2) + "\n")
            client.log_artifact(parent, str(folder / "best_params.json"))
        try:
            df = study.trials_dataframe()
            df.to_csv(folder / "trials.csv", index=False)
            client.log_artifact(parent, str(folder / "trials.csv"))
        except Exception as e:  # noqa: BLE001
            log.warning("trials table not logged: %s", e)


# ---------------------------------------------------------------------------------- the study


@dataclass
class StudySummary:
    study_name: str
    counts: dict[str, int]  # trials by state over the whole study (all workers)
    best: dict[str, Any] | None  # the best_params.json content; None when no trial completed
    parent_run_id: str | None
    trials_run_here: list[int] = field(default_factory=list)
    output: Path | None = None  # where best was written (None: not written)


def _finite_ap(value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return 0.0
    return v if math.isfinite(v) and v >= 0 else 0.0  # COCO eval gives -1 for "no ground truth"


def best_params(study: optuna.Study) -> dict[str, Any] | None:
    """``{"train.lr", "train.batch_repeat", "AP", "trial", "study"}`` of the best COMPLETE trial."""
    try:
        t = study.best_trial
    except ValueError:
        return None
    return {
        LR_PARAM: float(t.params[LR_PARAM]),
        REPEAT_PARAM: int(t.params[REPEAT_PARAM]),
        "AP": float(t.value),
        "trial": t.number,
        "study": study.study_name,
    }


def read_best_params(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no best parameters yet (run `make tune` first)")
    data = json.loads(p.read_text())
    for k in (LR_PARAM, REPEAT_PARAM):
        if k not in data:
            raise ValueError(f"{p}: missing {k}")
    return data


def best_overrides(path: str | os.PathLike[str]) -> list[str]:
    """``["train.lr=...", "train.batch_repeat=..."]`` from a best_params.json (for pipeline/train.py)."""
    data = read_best_params(path)
    return [f"{LR_PARAM}={float(data[LR_PARAM])!r}", f"{REPEAT_PARAM}={int(data[REPEAT_PARAM])}"]


def _default_train_fn() -> TrainFn:
    from pix2seq.training import run_training

    return run_training


def _free_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass


def _follow(train_fn: TrainFn) -> None:
    """Ranks > 0: train every trial rank 0 announces, until it announces ``None``."""
    from pix2seq.training import TrainHooks

    while True:
        msg = dist.broadcast_object(None)
        if msg is None:
            return
        tcfg = config_from_dict(msg["config"])
        try:
            train_fn(tcfg, TrainHooks(run_name=msg["run_name"], register_model=False))
        except Exception as e:  # noqa: BLE001 - rank 0 records the trial's failure
            log.warning(
                "rank %d: trial %d failed: %s: %s", dist.get_rank(), msg["number"], type(e).__name__, e
            )
        _free_memory()


def run_study(
    cfg: Config,
    *,
    train_fn: TrainFn | None = None,
    storage: optuna.storages.BaseStorage | str | None = None,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    runs_dir: str | os.PathLike[str] = "runs/tune",
    max_retry: int | None = DEFAULT_MAX_RETRY,
    grace_period_s: int | None = None,
    write_output: bool = True,
    plots: bool = True,
    poll_s: float | None = None,
) -> StudySummary | None:
    """Run this worker's part of the study ``cfg.tune.study_name``; see the module doc.

    Args:
        train_fn: ``(cfg, hooks) -> TrainResult``; default :func:`pix2seq.training.run_training`
            (tests pass a cheap stand-in honouring the same contract).
        storage / sampler / pruner: default from ``cfg.tune`` (:func:`make_storage` with heartbeats,
            :func:`make_sampler`, :func:`make_pruner`).
        runs_dir: trial ``n`` trains in ``<runs_dir>/<study>/trial-<n>``.
        max_retry, grace_period_s: retries of a trial whose worker died; heartbeat silence that
            declares it dead (default ``2 * tune.heartbeat_s``).
        write_output: write the best params to ``tune.output`` (rank 0).
        plots: draw the study's plots for its MLflow run when this worker stops.
        poll_s: how often a worker waiting for other workers' last trials looks at the study.
    Returns:
        On rank 0 the :class:`StudySummary` (the study's state when this worker stopped); on other
        ranks of a torchrun job ``None``.
    """
    train_fn = train_fn or _default_train_fn()
    info = dist.init_distributed()
    if not info.is_main:
        _follow(train_fn)
        return None

    tu = cfg.tune
    if storage is None:
        storage = make_storage(tu.storage, tu.heartbeat_s, grace_period_s, max_retry)
    heartbeat = (
        isinstance(storage, optuna.storages.RDBStorage) and storage.get_heartbeat_interval() is not None
    )
    grace = (grace_period_s or 2 * tu.heartbeat_s) if heartbeat else None
    sampler = sampler or make_sampler(tu)
    pruner = pruner or make_pruner(tu)
    study, created = open_study(tu.study_name, storage, sampler, pruner)
    parent = _quietly(_parent_run, study, created, cfg, _study_params(cfg, sampler, pruner, grace, max_retry))
    worker = f"{socket.gethostname()}:{os.getpid()}"
    ran: list[int] = []

    def objective(trial: optuna.Trial) -> float:
        from pix2seq.engine import NonFiniteLossError
        from pix2seq.training import TrainHooks

        params = suggest_params(trial, tu)
        out = trial_output_dir(runs_dir, tu.study_name, trial.number)
        tcfg = trial_config(cfg, params, out)
        _clear_output_dir(out)
        retried = _retried_from(trial)
        trial.set_user_attr("output_dir", str(out))
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("world_size", info.world_size)
        ran.append(trial.number)
        run_name = f"{_safe_name(tu.study_name)}-trial-{trial.number}"
        evals: list[float] = []
        pruned_at: list[int] = []

        def on_eval(epoch: int, metrics: dict[str, float]) -> bool:
            ap = _finite_ap(metrics.get("AP"))
            evals.append(ap)
            trial.report(ap, step=len(evals))
            if trial.should_prune():
                pruned_at.append(len(evals))
                return True
            return False

        tags = {
            "optuna.study_name": tu.study_name,
            "optuna.trial_number": str(trial.number),
            "optuna.trial_state": "RUNNING",
            "optuna.worker": worker,
        }
        if retried is not None:
            tags["optuna.retry_of"] = str(retried)
        hooks = TrainHooks(
            on_eval=on_eval, parent_run_id=parent, run_name=run_name, tags=tags, register_model=False
        )
        # nothing that can fail on rank 0 alone between this broadcast and train_fn (the ranks would desync)
        dist.broadcast_object({"config": tcfg.to_dict(), "number": trial.number, "run_name": run_name})
        state, run_id, extra = "FAIL", None, {}
        try:
            result = train_fn(tcfg, hooks)
            run_id = result.run_id
            if pruned_at or result.stopped_early:
                state = "PRUNED"
                step = pruned_at[0] if pruned_at else len(evals)
                extra["optuna.pruned_at_eval"] = str(step)
                raise optuna.TrialPruned(
                    f"AP {evals[-1] if evals else float('nan'):.2f} at evaluation {step}"
                )
            value = _finite_ap(result.metrics.get("AP", result.best_ap) if result.metrics else result.best_ap)
            trial.set_user_attr("best_AP", _finite_ap(result.best_ap))
            state = "COMPLETE"
            return value
        except NonFiniteLossError as e:
            state = "PRUNED"
            extra["optuna.diverged"] = str(e)[:500]
            trial.set_user_attr("diverged", str(e)[:500])
            raise optuna.TrialPruned(f"diverged: {e}") from e
        except BaseException as e:
            if state == "FAIL":
                extra["optuna.fail_reason"] = f"{type(e).__name__}: {e}"[:1000]
            raise
        finally:
            if parent:
                _quietly(
                    _record_trial_run,
                    tcfg,
                    parent,
                    _trial_run_id(run_id, out),
                    trial.number,
                    state,
                    evals,
                    run_name,
                    extra,
                )
            _free_memory()

    deadline = time.monotonic() + tu.timeout_minutes * 60 if tu.timeout_minutes > 0 else None
    budget = StudyBudget(
        tu.n_trials,
        heartbeat,
        deadline,
        poll_s if poll_s is not None else float(min(max(tu.heartbeat_s, 1), 10)),
    )
    try:
        if budget.should_continue(study):
            remaining_s = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            study.optimize(
                objective,
                n_trials=None,
                timeout=remaining_s,
                catch=(Exception,),
                callbacks=[budget],
                gc_after_trial=True,
            )
        else:
            log.info("study %s already has its %d trials", tu.study_name, tu.n_trials)
    except BaseException:
        if parent:
            _quietly(lambda: _client().set_terminated(parent, status="KILLED"))
        raise
    dist.broadcast_object(None)  # the other ranks leave their loop

    counts = _counts(study)
    best = best_params(study)
    written = None
    if best is not None and write_output:
        written = Path(tu.output)
        atomic_write_text(written, json.dumps(best, indent=2) + "\n")
    if parent:
        _quietly(_log_study_summary, study, parent, best, counts, plots)
        _quietly(lambda: _client().set_terminated(parent, status="FINISHED"))
    return StudySummary(tu.study_name, counts, best, parent, ran, written)


def _clear_output_dir(out: Path) -> None:
    """A trial starts clean: earlier checkpoints / run id in its folder (an older study) are set aside."""
    if (out / "checkpoints").exists() or (out / "mlflow_run_id").exists():
        from pix2seq.training import set_aside

        dest = set_aside(out)
        log.warning("%s held an earlier run; moved it to %s", out, dest)
    out.mkdir(parents=True, exist_ok=True)

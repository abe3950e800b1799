"""The study: its name, sampler and pruner, and one worker's share of its trials.

A study is tied to the configuration it tunes: its name is ``<tune.study_name>-<digest>``, the digest
(:func:`config_digest`) covering every key a trial's training reads except the tuned ones, plus the
search space and the trial budget. Change the model, the data or the budget and the next ``make tune``
opens a new study instead of resuming one that measured something else; ``make train-best`` reads the
current configuration's study only (:func:`best_overrides`).

Every worker runs :func:`run_study` and the workers together finish ``tune.n_trials`` trials (COMPLETE +
PRUNED, counted over the whole study, so a stopped study resumes where it stopped). A trial is one
:func:`pix2seq.training.run_training` on a budget; its objective is the validation AP of the final
evaluation. Every evaluation reports AP to the pruner (step = the evaluation's ordinal, so trials of
different batch repetition compare at the same point of their budget), which never stops a trial in
the first ``tune.pruner_warmup`` of its evaluations (AP stays near 0 until the classes "click").

Failures: an exception in a trial records it FAIL and the study goes on (``KeyboardInterrupt`` stops
it); a diverged trial (NaN loss) is PRUNED, so the sampler learns it; a worker that dies stops its
trial's heartbeat and another worker fails and re-queues it (:mod:`.storage`).

Several processes per trial (torchrun): rank 0 owns the study and broadcasts each trial's config;
all ranks train together and agree on pruning inside ``run_training``; a ``None`` broadcast ends the
other ranks' loop. MLflow (:mod:`pix2seq.tracking.studies`): one parent run per study (its id in the
study's user attribute ``mlflow_parent_run_id``), every trial a child run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from pix2seq import distributed as dist
from pix2seq.atomic import atomic_write_text
from pix2seq.config import Config, config_from_dict, runtime_keys
from pix2seq.errors import Pix2SeqError
from pix2seq.fetch import md5_file
from pix2seq.tracking import studies
from pix2seq.tuning.budget import StudyBudget, counts
from pix2seq.tuning.report import study_report, trial_rows, verdict, write_report
from pix2seq.tuning.space import (
    LR_PARAM,
    REPEAT_PARAM,
    TUNED,
    expected_evaluations,
    safe_name,
    search_space,
    suggest_params,
    trial_config,
    trial_output_dir,
)
from pix2seq.tuning.storage import (
    DEFAULT_MAX_RETRY,
    PARENT_RUN_ATTR,
    make_storage,
    mask_url,
    retried_from,
)
from pix2seq.weights.official import PREFIX as OFFICIAL_PREFIX

if TYPE_CHECKING:
    from pix2seq.training import TrainHooks, TrainResult

log = logging.getLogger(__name__)

TrainFn = Callable[[Config, "TrainHooks"], "TrainResult"]
# tune keys that say where and how long a study runs, not what it measures
_NOT_THE_STUDY = ("tune.study_name", "tune.storage", "tune.n_trials", "tune.timeout_minutes", "tune.output")
# the evaluate stage's own keys: a trial never reads them (tests/test_pipeline.py checks it)
EVALUATE_ONLY = ("eval.num_vis", "eval.output_dir", "eval.checkpoint")


class StudyError(Pix2SeqError):
    """No study (or no finished trial) for the current configuration."""


# ------------------------------------------------------------------------------------ identity


def config_digest(cfg: Config) -> str:
    """8 hex digits of what a trial measures: the trial config (the budget applied) without the tuned
    keys, the trial's folder, runtime keys, the study's bookkeeping keys and the evaluate stage's."""
    tcfg = trial_config(cfg, {LR_PARAM: cfg.tune.lr_min, REPEAT_PARAM: cfg.tune.repeat_min}, "trial")
    skip = {*TUNED, "train.output_dir", *runtime_keys(), *_NOT_THE_STUDY, *EVALUATE_ONLY}
    flat = {k: v for k, v in tcfg.flat().items() if k not in skip}
    # a study of fine-tunes measures the weights they start from, not just the file's name
    flat["model.init_from"] = [tcfg.model.init_from, _file_digest(tcfg.model.init_from)]
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _file_digest(spec: str) -> str:
    """MD5 of a local model file (a retrained model starts a new study); "" for official:NAME or none."""
    return md5_file(Path(spec)) if spec and Path(spec).is_file() else ""


def _check_init_from(cfg: Config) -> None:
    """A missing local model file to fine-tune from fails the study before its first trial (every
    trial would fail on it); official:NAME is resolved by each trial (downloaded once, cached)."""
    spec = trial_config(
        cfg, {LR_PARAM: cfg.tune.lr_min, REPEAT_PARAM: cfg.tune.repeat_min}, "trial"
    ).model.init_from
    if spec and not spec.startswith(OFFICIAL_PREFIX) and not Path(spec).is_file():
        key = "tune.init_from" if cfg.tune.init_from else "model.init_from"
        raise StudyError(f"{key}: {spec}: no such file (train that model first: dvc repro train)")


def study_name(cfg: Config) -> str:
    """``<tune.study_name>-<config_digest>``: the study of this configuration."""
    return f"{cfg.tune.study_name}-{config_digest(cfg)}"


# ----------------------------------------------------------------------- sampler and pruner


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """TPE whose random draws for trial ``n`` come from a seed of ``(seed, n)``.

    Plain ``TPESampler(seed=s)`` in two workers draws the same random start-up points twice (each
    worker has the same generator). A fresh TPE per trial, seeded by the trial number, keeps one
    worker's study reproducible and gives concurrent workers different proposals (public API only:
    TPE keeps no state between trials but its generator). ``constant_liar`` keeps concurrent TPE
    proposals apart after the start-up phase.
    """

    def __init__(self, seed: int, **tpe_kwargs: Any) -> None:
        tpe_kwargs.setdefault("constant_liar", True)
        self.seed = int(seed)
        self.tpe_kwargs = tpe_kwargs
        self.tpe = self.for_trial(0)

    def for_trial(self, number: int) -> optuna.samplers.TPESampler:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(
                seed=(self.seed * 1_000_003 + number * 7919) % 2**32, **self.tpe_kwargs
            )

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.tpe = self.for_trial(trial.number)
        self.tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):  # noqa: ANN001, ANN201 - Optuna's signature
        return self.tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):  # noqa: ANN001, ANN201
        return self.tpe.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):  # noqa: ANN001, ANN201
        return self.tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values):  # noqa: ANN001, ANN201
        self.tpe.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.tpe.reseed_rng()


def make_sampler(cfg: Config) -> tuple[optuna.samplers.BaseSampler, str]:
    """``tune.sampler``: seeded TPE (at most half the trials, <= 10, are random start-up trials), or
    scrambled Sobol points (QMC: a few trials spread over the whole space; the sequence is indexed by
    the study's trials, so concurrent workers draw different points). Returns the sampler and its
    description (logged on the study run)."""
    if cfg.tune.sampler == "qmc":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.QMCSampler(
                qmc_type="sobol", scramble=True, seed=cfg.tune.sampler_seed, warn_independent_sampling=False
            )
        return sampler, f"QMC(sobol, scrambled, seed={cfg.tune.sampler_seed})"
    startup = min(10, max(1, cfg.tune.n_trials // 2))
    sampler = TrialSeededSampler(cfg.tune.sampler_seed, n_startup_trials=startup)
    return sampler, f"TPE(seed={cfg.tune.sampler_seed} + trial number, n_startup_trials={startup})"


def make_pruner(cfg: Config) -> tuple[optuna.pruners.BasePruner, str]:
    """``tune.pruner``: median (after min(5, n_trials/4) trials), Hyperband, or none; neither prunes
    in the first ``tune.pruner_warmup`` of a trial's evaluations. Returns the pruner and its description."""
    tu = cfg.tune
    n_evals = expected_evaluations(trial_config(cfg, {LR_PARAM: tu.lr_min, REPEAT_PARAM: 1}, "trial"))
    first = math.floor(tu.pruner_warmup * n_evals) + 1  # the first evaluation that may prune
    if tu.pruner == "median":
        startup = min(5, max(1, tu.n_trials // 4))
        desc = (
            f"MedianPruner(n_startup_trials={startup}, n_warmup_steps={first}; {n_evals} evaluations a trial)"
        )
        return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=first), desc
    if tu.pruner == "hyperband":
        desc = f"HyperbandPruner(min_resource={first}, reduction_factor=3; {n_evals} evaluations a trial)"
        return optuna.pruners.HyperbandPruner(
            min_resource=first, max_resource="auto", reduction_factor=3
        ), desc
    return optuna.pruners.NopPruner(), "none"


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
            study_name=name, storage=storage, sampler=sampler, pruner=pruner, direction="maximize"
        )
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
        if study.direction != optuna.study.StudyDirection.MAXIMIZE:
            raise StudyError(
                f"study {name!r} exists and does not maximise; choose another tune.study_name"
            ) from None
        return study, False


# ----------------------------------------------------------------------------- best params


def best_params(study: optuna.Study, from_model: bool = False) -> dict[str, Any] | None:
    """``{"train.lr", "train.batch_repeat", "AP", "trial", "study", "recommended", "verdict"}`` of the
    best COMPLETE trial; ``recommended`` is False when no trial learned measurably (:func:`.report.verdict`;
    ``from_model``: the trials fine-tune from ``tune.init_from``)."""
    try:
        t = study.best_trial
    except ValueError:
        return None
    recommended, why = verdict(trial_rows(study), from_model)
    return {
        LR_PARAM: float(t.params[LR_PARAM]),
        REPEAT_PARAM: int(t.params[REPEAT_PARAM]),
        "AP": float(t.value),
        "trial": t.number,
        "study": study.study_name,
        "recommended": recommended,
        "verdict": why,
    }


def best_overrides(cfg: Config) -> list[str]:
    """``["train.lr=...", "train.batch_repeat=..."]`` of the best trial of *this* configuration's study
    (``make train-best``); :class:`StudyError` when that study does not exist or has no finished trial."""
    name = study_name(cfg)
    storage = make_storage(cfg.tune.storage, heartbeat_s=0)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise StudyError(
            f"no study {name} in {mask_url(cfg.tune.storage)}: the configuration changed since the last "
            "tuning, or it never ran; run `make tune` first"
        ) from None
    best = best_params(study, from_model=bool(cfg.tune.init_from or cfg.model.init_from))
    if best is None:
        raise StudyError(f"study {name} has no completed trial yet; run `make tune`")
    if not best["recommended"]:
        raise StudyError(f"study {name}: {best['verdict']}")
    return [f"{LR_PARAM}={best[LR_PARAM]!r}", f"{REPEAT_PARAM}={best[REPEAT_PARAM]}"]


# ------------------------------------------------------------------------------------ MLflow


def _quietly(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The study's own MLflow bookkeeping must not fail a trial or the study."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        log.warning("MLflow bookkeeping failed (%s: %s); the study goes on", type(e).__name__, e)
        return None


def _study_params(cfg: Config, sampler: str, pruner: str, grace: int | None, max_retry: int | None) -> dict:
    tu = cfg.tune
    return {
        "study_name": tu.study_name,
        "config_digest": config_digest(cfg),
        "storage": mask_url(tu.storage),
        "direction": "maximize",
        "objective": "val/AP (validation, final evaluation of the trial)",
        "sampler": sampler,
        "pruner": pruner,
        "search_space": search_space(tu),
        "n_trials": tu.n_trials,
        "timeout_minutes": tu.timeout_minutes,
        "trial_minutes": tu.trial_minutes,
        "trial_epochs": tu.trial_epochs,
        "heartbeat_s": tu.heartbeat_s,
        "grace_period_s": grace,
        "max_retry": max_retry,
    }


def _parent_run(study: optuna.Study, created: bool, cfg: Config, params: dict, wait_s: float = 60.0) -> str:
    """The study's MLflow parent run: created by the study's creator, found by the other workers."""
    rid = None
    if not created:
        deadline = time.monotonic() + wait_s
        while True:  # a study without trials may have a creator that is still creating its run
            rid = study.user_attrs.get(PARENT_RUN_ATTR)
            if rid or study.get_trials(deepcopy=False) or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
        if rid and not studies.usable_run(rid):
            log.warning(
                "the study's MLflow run %s is not in this tracking store; starting a new parent run", rid
            )
            rid = None
    if rid is None:
        rid = studies.create_study_run(cfg.tracking.experiment, study.study_name)
        study.set_user_attr(PARENT_RUN_ATTR, rid)
        # workers that joined a creator-less study together: the last write wins, the others adopt it
        if not created:
            time.sleep(1.0)
            winner = study.user_attrs.get(PARENT_RUN_ATTR)
            if winner and winner != rid and studies.usable_run(winner):
                studies.delete_run(rid)
                rid = winner
    else:
        studies.reopen_run(rid)
    studies.log_study_params(rid, params)
    return rid


def _log_summary(parent: str, best: dict | None, states: dict[str, int], files: list[Path]) -> None:
    """The study's outcome on its MLflow parent run: counts, best value and params, the report files."""
    done = states["COMPLETE"] + states["PRUNED"]
    metrics = {f"trials_{k.lower()}": float(v) for k, v in states.items() if k != "WAITING"}
    tags = {}
    if best is not None:
        metrics["best_AP"] = float(best["AP"])
        tags = {f"best.{k}": best[k] for k in (*TUNED, "trial", "recommended")}
    plots = [f for f in files if f.suffix == ".png"]
    rest = [f for f in files if f.suffix != ".png"]
    studies.log_study_summary(parent, done, metrics, tags, rest, plots)


def trial_start(cfg: Config) -> str:
    """What each trial's weights start from, in words (the study report)."""
    m = trial_config(cfg, {LR_PARAM: cfg.tune.lr_min, REPEAT_PARAM: cfg.tune.repeat_min}, "trial").model
    if m.init_from:
        return m.init_from
    return "ImageNet backbone weights" if m.pretrained else "random weights"


def trial_budget(cfg: Config) -> str:
    """Each trial's training budget in words (the study report)."""
    tu = cfg.tune
    if tu.trial_minutes > 0:
        return f"for {tu.trial_minutes:g} min"
    if tu.trial_epochs > 0:
        return f"for {tu.trial_epochs} epochs"
    tr = cfg.train
    return f"for {tr.max_minutes:g} min" if tr.max_minutes > 0 else f"for {tr.epochs} epochs"


# ---------------------------------------------------------------------------------- the study


@dataclass
class StudySummary:
    study_name: str
    counts: dict[str, int]  # trials by state over the whole study (all workers)
    best: dict[str, Any] | None  # the best_params.json content; None when no trial completed
    parent_run_id: str | None
    trials_run_here: list[int] = field(default_factory=list)
    output: Path | None = None  # where best was written (None: not written)
    report: dict[str, Any] = field(default_factory=dict)  # .report.study_report: every trial, the verdict


def _finite_ap(value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return 0.0
    return v if math.isfinite(v) and v >= 0 else 0.0  # COCO eval gives -1 for "no ground truth"


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


def _clear_output_dir(out: Path) -> None:
    """A trial starts clean: earlier checkpoints / run id in its folder (an older study) are set aside."""
    if (out / "checkpoints").exists() or (out / "mlflow_run_id").exists():
        from pix2seq.training import set_aside

        dest = set_aside(out)
        log.warning("%s held an earlier run; moved it to %s", out, dest)
    out.mkdir(parents=True, exist_ok=True)


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


def run_study(
    cfg: Config,
    *,
    train_fn: TrainFn | None = None,
    storage: optuna.storages.BaseStorage | str | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    runs_dir: str | os.PathLike[str] = "runs/tune",
    max_retry: int | None = DEFAULT_MAX_RETRY,
    grace_period_s: int | None = None,
    write_output: bool = True,
    plots: bool = True,
    poll_s: float | None = None,
) -> StudySummary | None:
    """Run this worker's part of the study :func:`study_name` ``(cfg)``; see the module doc.

    Args:
        train_fn: ``(cfg, hooks) -> TrainResult``; default :func:`pix2seq.training.run_training`
            (tests pass a cheap stand-in honouring the same contract).
        storage / pruner: default from ``cfg.tune`` (:func:`make_storage` with heartbeats, :func:`make_pruner`).
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
    _check_init_from(cfg)
    name = study_name(cfg)
    if storage is None:
        storage = make_storage(tu.storage, tu.heartbeat_s, grace_period_s, max_retry)
    heartbeat = (
        isinstance(storage, optuna.storages.RDBStorage) and storage.get_heartbeat_interval() is not None
    )
    grace = (grace_period_s or 2 * tu.heartbeat_s) if heartbeat else None
    sampler, sampler_desc = make_sampler(cfg)
    pruner_desc = type(pruner).__name__ if pruner is not None else ""
    if pruner is None:
        pruner, pruner_desc = make_pruner(cfg)
    study, created = open_study(name, storage, sampler, pruner)
    params = _study_params(cfg, sampler_desc, pruner_desc, grace, max_retry)
    parent = _quietly(_parent_run, study, created, cfg, params)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    ran: list[int] = []

    def objective(trial: optuna.Trial) -> float:
        from pix2seq.engine import NonFiniteLossError
        from pix2seq.training import TrainHooks

        params = suggest_params(trial, tu)
        out = trial_output_dir(runs_dir, name, trial.number)
        tcfg = trial_config(cfg, params, out)
        _clear_output_dir(out)
        retried = retried_from(study, trial.number)
        trial.set_user_attr("output_dir", str(out))
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("world_size", info.world_size)
        ran.append(trial.number)
        run_name = f"{safe_name(name)}-trial-{trial.number}"
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
            "optuna.study_name": name,
            studies.TRIAL_TAG: str(trial.number),
            studies.STATE_TAG: "RUNNING",
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
            trial.set_user_attr("train_minutes", round(float(result.train_minutes), 3))
            trial.set_user_attr("steps", int(result.global_step))
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
                    studies.record_trial,
                    cfg.tracking.experiment,
                    parent,
                    _trial_run_id(run_id, out),
                    run_name=run_name,
                    number=trial.number,
                    state=state,
                    tags={"optuna.study_name": name, **extra},
                    params=tcfg.flat(),
                    evals=evals,
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
            log.info("study %s already has its %d trials", name, tu.n_trials)
    except BaseException:
        if parent:
            _quietly(studies.end_run, parent, "KILLED")
        raise
    dist.broadcast_object(None)  # the other ranks leave their loop

    states = counts(study)
    from_model = bool(cfg.tune.init_from or cfg.model.init_from)
    best = best_params(study, from_model)
    report = study_report(study, trial_budget(cfg), trial_start(cfg), from_model)
    written = None
    with tempfile.TemporaryDirectory(prefix="pix2seq-tune-") as tmp:
        folder = Path(tu.report_dir) if write_output else Path(tmp)
        files = write_report(study, report, folder, plots=plots)
        if best is not None and write_output:
            best["config_digest"] = config_digest(cfg)
            written = atomic_write_text(tu.output, json.dumps(best, indent=2) + "\n")
            files.append(written)
        if parent:
            _quietly(_log_summary, parent, best, states, files)
            _quietly(studies.end_run, parent, "FINISHED")
    return StudySummary(name, states, best, parent, ran, written, report)

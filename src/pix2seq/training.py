"""A whole training run: data, model, DDP, resume, periodic evaluation, checkpoints and MLflow.

Launched by ``torchrun`` (one process on CPU, one per GPU, several nodes through c10d): every rank
runs :func:`run_training`, which reads like DETR's ``main``: a table of contents of short steps. Rank 0
alone logs, reports and writes checkpoints, and every decision (stop, prune, best) is agreed so that
no rank waits on a collective the others skipped.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pix2seq import distributed as dist
from pix2seq.atomic import atomic_write_text
from pix2seq.checkpoint import (
    TRAINING_ENTRIES,
    CheckpointError,
    CheckpointManager,
    capture_rng_state,
    config_from_checkpoint,
    export_model_file,
    restore_rng_state,
)
from pix2seq.config import Config, runtime_keys, save_config
from pix2seq.data.loaders import DetectionData, load_detection_data
from pix2seq.engine import TrainState, evaluate_model, train_one_epoch
from pix2seq.model import build_model
from pix2seq.optim import build_optimizer, build_schedule
from pix2seq.precision import choose as choose_precision
from pix2seq.tracking import RunTracker
from pix2seq.weights.init import load_initial_weights


@dataclass
class TrainHooks:
    """Ways for a caller (the tuner) to watch and steer a run."""

    # (epoch, metrics) -> True to stop now (e.g. pruned). Called on rank 0; the answer is agreed.
    on_eval: Callable[[int, dict[str, float]], bool] | None = None
    parent_run_id: str | None = None
    run_name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    register_model: bool | None = None  # None: cfg.tracking.register


@dataclass
class TrainResult:
    metrics: dict[str, float]  # the final evaluation
    best_ap: float
    run_id: str | None
    output_dir: Path
    global_step: int
    stopped_early: bool
    train_minutes: float = 0.0  # training wall clock (evaluations excluded), resumptions included


@dataclass
class Run:
    """Everything a training run holds, passed between its steps."""

    cfg: Config
    hooks: TrainHooks
    info: dist.DistInfo
    data: DetectionData
    model: nn.Module  # the bare model (checkpoints, evaluation)
    train_model: nn.Module  # what the steps run: DDP-wrapped and/or compiled
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Any
    checkpoints: CheckpointManager
    state: TrainState
    tracker: RunTracker | None = None

    @property
    def out(self) -> Path:
        return Path(self.cfg.train.output_dir)


def run_training(cfg: Config, hooks: TrainHooks | None = None) -> TrainResult:
    """Train (resuming from the latest checkpoint when one exists), evaluate, track; see module doc."""
    hooks = hooks or TrainHooks()
    info = dist.init_distributed()
    if info.is_main:  # measured (or read from the cache) by one process, then read by the others
        choose_precision(cfg.train.amp, info.device)
    dist.barrier()
    seed_everything(cfg.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
    data = load_detection_data(cfg, distributed=info.world_size > 1)
    data.check_trainable()  # an empty split fails here, naming its manifest, not after 0 steps
    model, criterion = build_model(cfg, data.vocab)
    if cfg.model.init_from:  # before the optimizer: a fine-tune starts a fresh one
        summary = load_initial_weights(model, cfg, data.vocab, data.categories)
        if info.is_main:
            print(summary)
    model.to(info.device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.train, info.device)
    steps_per_epoch = max(1, data.train_batches_per_epoch() // cfg.train.accumulate)
    schedule = build_schedule(optimizer, cfg.train, steps_per_epoch)
    checkpoints = CheckpointManager(
        Path(cfg.train.output_dir) / "checkpoints", keep=cfg.train.keep_checkpoints
    )
    run = Run(cfg, hooks, info, data, model, model, criterion, optimizer, schedule, checkpoints, TrainState())
    resumed = resume_if_possible(run)
    run.train_model = wrap_for_training(model, cfg, info)
    run.tracker = make_tracker(run, resumed)
    status = "FAILED"
    try:
        start_tracking(run)
        metrics, stopped = train_and_evaluate(run)
        if info.is_main:
            write_outputs(run, metrics)
            log_model(run)
        status = "KILLED" if stopped else "FINISHED"
        return TrainResult(
            metrics,
            run.state.best_metric,
            run.tracker.run_id,
            run.out,
            run.state.global_step,
            stopped,
            run.state.elapsed_s / 60,
        )
    finally:
        run.tracker.end(status)
        dist.barrier()


# ----------------------------------------------------------------------------------- setting up


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# keys that may change between an interrupted run and its resumption
_RESUME_FREE = ("train.output_dir", "train.log_every_steps", "data.prepared_dir", "data.root")
_RESUME_FREE_SECTIONS = ("eval.", "tracking.", "tune.", "data.download.", "data.prepare.", "data.local.")


def resume_blockers(cfg: Config, ckpt: dict, path: Path) -> list[str]:
    """Why ``ckpt`` should not be resumed under ``cfg``: changed config keys, or a finished run.

    A stored config that does not load is a :class:`CheckpointError` naming ``path``."""
    old = config_from_checkpoint(ckpt, path).flat()
    new = cfg.flat()
    free = {*_RESUME_FREE, *runtime_keys()}
    changed = [
        k for k in new if old.get(k) != new[k] and k not in free and not k.startswith(_RESUME_FREE_SECTIONS)
    ]
    reasons = [f"config changed: {', '.join(changed[:8])}"] if changed else []
    sched = ckpt.get("scheduler", {})
    budget = float(sched.get("budget_s", 0) or 0)
    finished = (
        int(ckpt["epoch"]) >= cfg.train.epochs
        or (budget > 0 and float(sched.get("elapsed_s", 0)) >= budget)
        or (budget == 0 and int(sched.get("step_count", 0)) >= int(sched.get("total_steps", 1 << 62)))
    )
    if finished and not ckpt.get("eval_pending", False):  # pending: its final evaluation is still due
        reasons.append("that run already finished")
    return reasons


def set_aside(out: Path) -> Path:
    """Move earlier checkpoints and run id out of the way (nothing is deleted)."""
    dest = out / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("checkpoints", "mlflow_run_id"):
        if (out / name).exists():
            (out / name).rename(dest / name)
    return dest


def resumable_checkpoint(
    cfg: Config, manager: CheckpointManager, out: Path, info: dist.DistInfo
) -> tuple[Path, dict] | None:
    """The checkpoint to resume (``train.resume: auto``), or None for a new run. Checkpoints a new
    run would overwrite (another config's, a finished run's, any with ``train.resume: never``) are
    moved aside first; unreadable ones fail with one line pointing at ``train.resume=never``."""
    reasons: list[str] = []
    path = manager.latest()
    if cfg.train.resume == "auto":
        found = manager.load_latest(map_location="cpu", required=TRAINING_ENTRIES)
        if found is None:
            return None
        path, ckpt = found
        try:
            reasons = resume_blockers(cfg, ckpt, path)
        except CheckpointError as e:
            raise CheckpointError(
                f"{e}; to start a new run instead, set train.resume=never (the checkpoints are moved aside)"
            ) from None
        if not reasons:
            return found
    elif path is not None:
        reasons = ["train.resume is never"]
    if reasons:
        dist.barrier()
        if info.is_main:
            dest = set_aside(out)
            print(f"not resuming {path} ({'; '.join(reasons)}): moved it to {dest}, starting a new run")
        dist.barrier()
    return None


def resume_if_possible(run: Run) -> bool:
    """Restore the model, optimizer, schedule, RNGs and progress of :func:`resumable_checkpoint`;
    True when training resumes."""
    found = resumable_checkpoint(run.cfg, run.checkpoints, run.out, run.info)
    if found is None:
        return False
    path, ckpt = found
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.schedule.load_state_dict(ckpt["scheduler"])
    restore_rng_state(ckpt["rng"], rank=run.info.rank)
    run.state = TrainState(
        epoch=int(ckpt["epoch"]),
        step_in_epoch=int(ckpt["step_in_epoch"]),
        global_step=int(ckpt["global_step"]),
        elapsed_s=float(ckpt["elapsed_s"]),
        best_metric=float(ckpt["best_metric"]),
        history={k: [tuple(x) for x in v] for k, v in ckpt.get("history", {}).items()},
        eval_pending=bool(ckpt.get("eval_pending", False)),
    )
    if run.info.is_main:
        s = run.state
        print(f"resumed from {path}: epoch {s.epoch}, batch {s.step_in_epoch}, step {s.global_step}")
    return True


def wrap_for_training(model: nn.Module, cfg: Config, info: dist.DistInfo) -> nn.Module:
    """DDP on several processes (SyncBatchNorm for BatchNorm on GPUs), then ``torch.compile`` if asked."""
    if info.world_size > 1:
        if (
            info.device.type == "cuda"
            and cfg.model.backbone_norm in ("auto", "batch")
            and not cfg.model.pretrained
        ):
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [info.device.index] if info.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return torch.compile(model) if cfg.train.compile else model


def make_tracker(run: Run, resumed: bool) -> RunTracker:
    """The run's MLflow tracker (active on rank 0 only), named readably: the DVC experiment, the
    tuning trial, else ``train-<time>``. A resumed training continues its MLflow run."""
    hooks, info = run.hooks, run.info
    return RunTracker(
        run.cfg,
        enabled=info.is_main,
        run_name=hooks.run_name,
        run_id_file=run.out / "mlflow_run_id",
        resume=resumed,
        parent_run_id=hooks.parent_run_id,
        tags={**hooks.tags, "world_size": info.world_size, "device": info.device.type},
    )


def start_tracking(run: Run) -> None:
    """Start the MLflow run with the config (params and file), the datasets with their digests, and
    the precision chosen for this device (printed once, tagged ``precision.*``)."""
    run.tracker.start()
    if run.info.is_main:
        precision = choose_precision(run.cfg.train.amp, run.info.device)
        print(precision.describe())
        run.tracker.set_tags(precision.tags())
        save_config(run.cfg, run.out / "config.yaml")
        run.tracker.log_artifact(run.out / "config.yaml")
        run.tracker.log_dataset(run.data.train_manifest, name=run.data.name + "-train", context="training")
        run.tracker.log_dataset(run.data.val_manifest, name=run.data.name + "-val", context="evaluation")


# ------------------------------------------------------------------------------------ the loop


def save_checkpoint(run: Run, is_best: bool = False) -> None:
    """Every rank's RNG state gathered; rank 0 writes ``ckpt-<step>.pt`` (and ``last``/``best``)."""
    rngs = dist.all_gather_object(capture_rng_state())
    if run.info.is_main:
        s, data = run.state, run.data
        run.checkpoints.save(
            {
                "model": run.model.state_dict(),
                "optimizer": run.optimizer.state_dict(),
                "scheduler": run.schedule.state_dict(),
                "rng": rngs,  # one state per rank
                "epoch": s.epoch,
                "step_in_epoch": s.step_in_epoch,
                "global_step": s.global_step,
                "elapsed_s": s.elapsed_s,
                "best_metric": s.best_metric,
                "history": s.history,
                "eval_pending": s.eval_pending,
                "config": run.cfg.to_dict(),
                "vocab": data.vocab.to_dict(),
                "categories": data.categories,
            },
            step=s.global_step,
            is_best=is_best,
        )
    dist.barrier()


def evaluate(run: Run) -> tuple[dict[str, float], bool]:
    """Validation AP now; rank 0 logs ``val/*`` and the prediction grid at this step. Returns the
    metrics (empty on other ranks) and whether they are the best so far (agreed)."""
    cfg, state = run.cfg, run.state
    keep = cfg.tracking.log_images if run.info.is_main else 0
    metrics, _, samples = evaluate_model(
        run.model, run.data, run.data.vocab, cfg, run.info.device, keep_images=keep
    )
    is_best = False
    if run.info.is_main:
        run.tracker.log_metrics({f"val/{k}": v for k, v in metrics.items()}, step=state.global_step)
        if samples:
            from pix2seq.evaluation.plots import prediction_grid

            grid = prediction_grid(samples, [c["name"] for c in run.data.categories])
            run.tracker.log_image(grid, "val/predictions", step=state.global_step)
        for key in ("AP", "AP50"):
            state.history.setdefault(key, []).append((state.global_step, metrics[key]))
        state.history.setdefault("train_minutes", []).append((state.global_step, state.elapsed_s / 60))
        is_best = metrics["AP"] > state.best_metric
        state.best_metric = max(state.best_metric, metrics["AP"])
        print(
            f"epoch {state.epoch} step {state.global_step}: "
            + " ".join(f"{k} {v:.1f}" for k, v in metrics.items())
        )
    return metrics, dist.agree(is_best)


def train_and_evaluate(run: Run) -> tuple[dict[str, float], bool]:
    """Epochs (or a wall-clock budget) of training, evaluating on the epoch and/or minute period and
    once at the end; returns the last evaluation's metrics and whether a hook stopped the run.

    A checkpoint is written before every evaluation (``eval_pending``): an evaluation that fails
    loses no training, and a run resumed from such a checkpoint evaluates first."""
    cfg, state, data, info = run.cfg, run.state, run.data, run.info
    clock_start = time.perf_counter() - state.elapsed_s
    last_eval_clock = state.elapsed_s
    eval_period_s = cfg.train.eval_every_minutes * 60

    def eval_due(clock: float) -> bool:
        return eval_period_s > 0 and clock - last_eval_clock >= eval_period_s

    def more_training() -> bool:
        return state.epoch < cfg.train.epochs and not run.schedule.done()

    def on_step(values: dict[str, float]) -> None:
        run.tracker.log_metrics({f"train/{k}": v for k, v in values.items()}, step=state.global_step)
        state.history.setdefault("loss", []).append((state.global_step, values["loss"]))

    metrics: dict[str, float] = {}
    stopped = False
    evaluated_at = -1
    while not stopped and (state.eval_pending or more_training()):
        if not state.eval_pending:  # a training pass: an epoch, or up to an evaluation on the clock
            loader = data.train_loader(epoch=state.epoch, skip_batches=state.step_in_epoch)
            epoch_stats = train_one_epoch(
                run.train_model,
                run.criterion,
                loader,
                run.optimizer,
                run.schedule,
                cfg,
                state,
                info.device,
                clock_start,
                on_step=on_step,
                on_checkpoint=lambda: save_checkpoint(run),
                num_batches=data.train_batches_per_epoch(),
                pause=eval_due,
            )
            epoch_done = state.step_in_epoch >= data.train_batches_per_epoch() - cfg.train.accumulate + 1
            if epoch_done:
                state.epoch += 1
                state.step_in_epoch = 0
            run.tracker.log_metrics(
                {"train/epoch_loss": epoch_stats["loss"], "train/epoch": state.epoch}, step=state.global_step
            )
            due = (
                epoch_done
                and cfg.train.eval_every_epochs > 0
                and state.epoch % cfg.train.eval_every_epochs == 0
            )
            state.eval_pending = due or eval_due(state.elapsed_s) or not more_training()
            save_checkpoint(run)
            if not state.eval_pending:
                continue
        t_eval = time.perf_counter()
        metrics, is_best = evaluate(run)
        # a wall-clock budget is training time: shift the clock's origin past the evaluation
        clock_start += dist.all_reduce_mean(
            torch.tensor(time.perf_counter() - t_eval, dtype=torch.float64)
        ).item()
        last_eval_clock = state.elapsed_s
        evaluated_at = state.global_step
        stop = (
            bool(run.hooks.on_eval(state.epoch, metrics)) if (run.hooks.on_eval and info.is_main) else False
        )
        stopped = dist.agree(stop)
        state.eval_pending = False
        save_checkpoint(run, is_best=is_best)  # the same step again, with this evaluation recorded
    if evaluated_at != state.global_step and not stopped:
        metrics, is_best = evaluate(run)
        if is_best:
            save_checkpoint(run, is_best=True)
    return metrics, stopped


# ------------------------------------------------------------------------------------- outputs


def write_history(folder: Path, history: dict[str, list]) -> None:
    """``<name>.csv`` (step,<name>) per curve, for ``dvc plots`` and the MLflow run."""
    for name, points in history.items():
        rows = "\n".join(f"{int(step)},{float(v)}" for step, v in points)
        atomic_write_text(folder / f"{name}.csv", f"step,{name}\n{rows}\n")


def write_outputs(run: Run, metrics: dict[str, float]) -> None:
    """``train_summary.json`` (a DVC metric), the curves (DVC plots) and ``model.pt``, the best
    checkpoint without its optimizer state (rank 0)."""
    state = run.state
    summary = {
        "best_AP": state.best_metric,
        "global_step": state.global_step,
        "epochs": state.epoch,
        "train_minutes": state.elapsed_s / 60,
        **{f"final_{k}": v for k, v in metrics.items()},
    }
    atomic_write_text(run.out / "train_summary.json", json.dumps(summary, indent=2))
    write_history(run.out / "plots", state.history)
    run.tracker.log_metrics({"val/best_AP": state.best_metric}, step=state.global_step)
    run.tracker.log_artifact(run.out / "train_summary.json")
    best = run.checkpoints.best_or_last_path
    if best.exists():
        export_model_file(best, run.out / "model.pt")


def log_model(run: Run) -> None:
    """Upload ``best.pt`` (the weights only) and the pyfunc model; register it under its task and
    move that task's champion alias when it beats it (rank 0)."""
    from pix2seq.serving import log_pyfunc_model

    model_file = run.out / "model.pt"
    if not run.tracker.active or not model_file.exists():
        return
    run.tracker.log_artifact_as(model_file, "checkpoints/best.pt")
    register = run.cfg.tracking.register if run.hooks.register_model is None else run.hooks.register_model
    log_pyfunc_model(run.tracker, model_file, run.cfg, run.data, register=register, ap=run.state.best_metric)

"""A whole training run: data, model, DDP, resume, periodic evaluation, checkpoints and MLflow.

Launched by ``torchrun`` (one process on CPU, one per GPU, several nodes through c10d): every rank
runs :func:`run_training`; rank 0 alone logs, reports and writes checkpoints, and every decision
(stop, prune, best) is agreed so that no rank waits on a collective the others skipped.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pix2seq import distributed as dist
from pix2seq.checkpoint import (
    TRAINING_ENTRIES,
    CheckpointError,
    CheckpointManager,
    capture_rng_state,
    config_from_checkpoint,
    restore_rng_state,
)
from pix2seq.config import Config, atomic_write_text, save_config
from pix2seq.data.loaders import load_detection_data
from pix2seq.engine import TrainState, evaluate_model, train_one_epoch
from pix2seq.model import build_model
from pix2seq.optim import build_optimizer, build_schedule
from pix2seq.tracking import RunTracker
from pix2seq.vocab import Vocab


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def checkpoint_state(
    model: nn.Module,
    optimizer,
    schedule,
    scaler,
    state: TrainState,
    cfg: Config,
    vocab: Vocab,
    categories: list[dict],
    rng: list[dict],
) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": schedule.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng,  # one state per rank
        "epoch": state.epoch,
        "step_in_epoch": state.step_in_epoch,
        "global_step": state.global_step,
        "elapsed_s": state.elapsed_s,
        "best_metric": state.best_metric,
        "history": state.history,
        "eval_pending": state.eval_pending,
        "config": cfg.to_dict(),
        "vocab": vocab.to_dict(),
        "categories": categories,
    }


def _restore(ckpt: dict, model: nn.Module, optimizer, schedule, scaler, rank: int) -> TrainState:
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    schedule.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    restore_rng_state(ckpt["rng"], rank=rank)
    return TrainState(
        epoch=int(ckpt["epoch"]),
        step_in_epoch=int(ckpt["step_in_epoch"]),
        global_step=int(ckpt["global_step"]),
        elapsed_s=float(ckpt["elapsed_s"]),
        best_metric=float(ckpt["best_metric"]),
        history={k: [tuple(x) for x in v] for k, v in ckpt.get("history", {}).items()},
        eval_pending=bool(ckpt.get("eval_pending", False)),
    )


# keys that may change between an interrupted run and its resumption
_RESUME_FREE = (
    "train.resume",
    "train.output_dir",
    "train.log_every_steps",
    "train.checkpoint_every_steps",
    "train.keep_checkpoints",
    "data.num_workers",
    "data.prepared_dir",
    "data.root",
)
_RESUME_FREE_SECTIONS = ("eval.", "tracking.", "tune.", "data.download.", "data.prepare.")


def resume_blockers(cfg: Config, ckpt: dict, path: Path) -> list[str]:
    """Why ``ckpt`` should not be resumed under ``cfg``: changed config keys, or a finished run.

    A stored config that does not load is a :class:`CheckpointError` naming ``path``."""
    old = config_from_checkpoint(ckpt, path).flat()
    new = cfg.flat()
    changed = [
        k
        for k in new
        if old.get(k) != new[k] and k not in _RESUME_FREE and not k.startswith(_RESUME_FREE_SECTIONS)
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


def set_aside(out: Path) -> Path:
    """Move earlier checkpoints and run id out of the way (nothing is deleted)."""
    dest = out / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("checkpoints", "mlflow_run_id"):
        if (out / name).exists():
            (out / name).rename(dest / name)
    return dest


def _wrap_distributed(model: nn.Module, cfg: Config, info: dist.DistInfo) -> nn.Module:
    if info.world_size == 1:
        return model
    if (
        info.device.type == "cuda"
        and cfg.model.backbone_norm in ("auto", "batch")
        and not cfg.model.pretrained
    ):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def run_training(cfg: Config, hooks: TrainHooks | None = None) -> TrainResult:
    """Train (resuming from the latest checkpoint when one exists), evaluate, track; see module doc."""
    hooks = hooks or TrainHooks()
    info = dist.init_distributed()
    device = info.device
    out = Path(cfg.train.output_dir)
    seed_everything(cfg.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)

    data = load_detection_data(cfg, distributed=info.world_size > 1)
    data.check_trainable()  # an empty split fails here, naming its manifest, not after 0 steps
    vocab = data.vocab
    model, criterion = build_model(cfg, vocab)
    model.to(device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    model_without_ddp = model
    optimizer = build_optimizer(model_without_ddp, cfg.train, device)
    steps_per_epoch = max(1, data.train_batches_per_epoch() // cfg.train.accumulate)
    schedule = build_schedule(optimizer, cfg.train, steps_per_epoch)
    # bf16 needs no loss scaling; the scaler is kept (disabled) so fp16 can be added without a format change
    scaler = torch.amp.GradScaler(device.type, enabled=False)

    manager = CheckpointManager(out / "checkpoints", keep=cfg.train.keep_checkpoints)
    state = TrainState()
    resumed = False
    found = resumable_checkpoint(cfg, manager, out, info)
    if found is not None:
        path, ckpt = found
        state = _restore(ckpt, model_without_ddp, optimizer, schedule, scaler, info.rank)
        resumed = True
        if info.is_main:
            print(
                f"resumed from {path}: epoch {state.epoch}, batch {state.step_in_epoch}, step {state.global_step}"
            )
    model = _wrap_distributed(model_without_ddp, cfg, info)
    train_model = torch.compile(model) if cfg.train.compile else model

    tracker = RunTracker(
        cfg,
        enabled=info.is_main,
        run_name=hooks.run_name,
        run_id_file=out / "mlflow_run_id",
        resume=resumed,
        parent_run_id=hooks.parent_run_id,
        tags={**hooks.tags, "world_size": info.world_size, "device": device.type},
    )
    status = "FAILED"
    try:
        run_id = tracker.start()
        if info.is_main:
            save_config(cfg, out / "config.yaml")
            tracker.log_artifact(out / "config.yaml")
            tracker.log_dataset(data.train_manifest, name=data.name + "-train", context="training")
            tracker.log_dataset(data.val_manifest, name=data.name + "-val", context="evaluation")

        def on_step(values: dict[str, float]) -> None:
            tracker.log_metrics({f"train/{k}": v for k, v in values.items()}, step=state.global_step)
            state.history.setdefault("loss", []).append((state.global_step, values["loss"]))

        def save(is_best: bool = False) -> None:
            rngs = dist.all_gather_object(capture_rng_state())
            if info.is_main:
                st = checkpoint_state(
                    model_without_ddp, optimizer, schedule, scaler, state, cfg, vocab, data.categories, rngs
                )
                manager.save(st, step=state.global_step, is_best=is_best)
            dist.barrier()

        clock_start = time.perf_counter() - state.elapsed_s
        last_eval_clock = state.elapsed_s
        eval_period_s = cfg.train.eval_every_minutes * 60

        def eval_due(clock: float) -> bool:
            return eval_period_s > 0 and clock - last_eval_clock >= eval_period_s

        metrics: dict[str, float] = {}
        stopped = False
        evaluated_at = -1

        def more_training() -> bool:
            return state.epoch < cfg.train.epochs and not schedule.done()

        while not stopped and (state.eval_pending or more_training()):
            if not state.eval_pending:  # a training pass: an epoch, or up to an evaluation on the clock
                loader = data.train_loader(epoch=state.epoch, skip_batches=state.step_in_epoch)
                epoch_stats = train_one_epoch(
                    train_model,
                    criterion,
                    loader,
                    optimizer,
                    schedule,
                    cfg,
                    state,
                    device,
                    clock_start,
                    on_step=on_step,
                    on_checkpoint=save,
                    num_batches=data.train_batches_per_epoch(),
                    pause=eval_due,
                )
                epoch_done = state.step_in_epoch >= data.train_batches_per_epoch() - cfg.train.accumulate + 1
                if epoch_done:
                    state.epoch += 1
                    state.step_in_epoch = 0
                tracker.log_metrics(
                    {"train/epoch_loss": epoch_stats["loss"], "epoch": state.epoch}, step=state.global_step
                )
                due = (
                    epoch_done
                    and cfg.train.eval_every_epochs > 0
                    and state.epoch % cfg.train.eval_every_epochs == 0
                )
                state.eval_pending = due or eval_due(state.elapsed_s) or not more_training()
                # checkpoint before evaluating: an evaluation that fails loses no training, and a
                # run resumed from here evaluates first (eval_pending)
                save()
                if not state.eval_pending:
                    continue
            t_eval = time.perf_counter()
            metrics, _, _ = evaluate_model(model_without_ddp, data, vocab, cfg, device)
            # a wall-clock budget is training time: shift the clock's origin past the evaluation
            clock_start += dist.all_reduce_mean(
                torch.tensor(time.perf_counter() - t_eval, dtype=torch.float64)
            ).item()
            last_eval_clock = state.elapsed_s
            evaluated_at = state.global_step
            is_best = False
            if info.is_main:
                tracker.log_metrics(metrics, step=state.global_step)
                for key, value in (
                    ("AP", metrics["AP"]),
                    ("AP50", metrics["AP50"]),
                    ("train_minutes", state.elapsed_s / 60),
                ):
                    state.history.setdefault(key, []).append((state.global_step, value))
                is_best = metrics["AP"] > state.best_metric
                state.best_metric = max(state.best_metric, metrics["AP"])
                print(
                    f"epoch {state.epoch} step {state.global_step}: "
                    + " ".join(f"{k} {v:.1f}" for k, v in metrics.items())
                )
            stop = bool(hooks.on_eval(state.epoch, metrics)) if (hooks.on_eval and info.is_main) else False
            stopped = dist.agree(stop)
            state.eval_pending = False
            save(is_best=dist.agree(is_best))  # the same step again, with this evaluation recorded
        if evaluated_at != state.global_step and not stopped:
            metrics, _, _ = evaluate_model(model_without_ddp, data, vocab, cfg, device)
            better = info.is_main and metrics["AP"] > state.best_metric
            if info.is_main:
                tracker.log_metrics(metrics, step=state.global_step)
                state.best_metric = max(state.best_metric, metrics["AP"])
            if dist.agree(better):
                save(is_best=True)
        if info.is_main:
            summary = {
                "best_AP": state.best_metric,
                "global_step": state.global_step,
                "epochs": state.epoch,
                "train_minutes": state.elapsed_s / 60,
                **{f"final_{k}": v for k, v in metrics.items()},
            }
            atomic_write_text(out / "train_summary.json", json.dumps(summary, indent=2))
            write_history(out / "plots", state.history)
            tracker.log_metrics({"best_AP": state.best_metric}, step=state.global_step)
            tracker.log_artifact(out / "train_summary.json")
            _log_checkpoints_and_model(tracker, manager, cfg, hooks, state)
        status = "KILLED" if stopped else "FINISHED"
        return TrainResult(metrics, state.best_metric, run_id, out, state.global_step, stopped)
    finally:
        tracker.end(status)
        dist.barrier()


def _log_checkpoints_and_model(
    tracker: RunTracker, manager: CheckpointManager, cfg: Config, hooks: TrainHooks, state: TrainState
) -> None:
    """Export the best model to ``<output_dir>/model.pt``; log checkpoints and the pyfunc model (registered)."""
    from pix2seq.serving import export_model_file, log_pyfunc_model

    best = manager.best_path if manager.best_path.exists() else manager.last_path
    if not best.exists():
        return
    slim = export_model_file(best, Path(cfg.train.output_dir) / "model.pt")
    if not tracker.active:
        return
    for p in (manager.last_path, manager.best_path):
        if p.exists():
            tracker.log_artifact(p, "checkpoints")
    register = cfg.tracking.register if hooks.register_model is None else hooks.register_model
    log_pyfunc_model(tracker, slim, cfg, register=register, ap=state.best_metric)


def write_history(folder: Path, history: dict[str, list]) -> None:
    """``<name>.csv`` (step,<name>) per curve, for ``dvc plots`` and the MLflow run."""
    for name, points in history.items():
        rows = "\n".join(f"{int(step)},{float(v)}" for step, v in points)
        atomic_write_text(folder / f"{name}.csv", f"step,{name}\n{rows}\n")


def result_json(result: TrainResult) -> str:
    d = asdict(result)
    d["output_dir"] = str(result.output_dir)
    return json.dumps(d, indent=2)

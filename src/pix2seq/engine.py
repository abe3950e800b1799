"""One training epoch and one evaluation pass, each returning a metric dict (DETR's engine.py).

Everything distributed is agreed through collectives: the loss that is logged and checked is the
mean over ranks, and the elapsed time that drives a wall-clock schedule is the ranks' mean, so every
rank takes the same decisions (stop, evaluate, checkpoint) at the same step.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm import tqdm

from pix2seq import distributed as dist
from pix2seq.config import Config
from pix2seq.detect import Decoded, decode
from pix2seq.errors import Pix2SeqError
from pix2seq.evaluation.coco import CocoResult, coco_evaluate, detections_to_coco
from pix2seq.optim import WarmupLinearSchedule
from pix2seq.precision import autocast_dtype
from pix2seq.precision import choose as choose_precision
from pix2seq.vocab import Vocab

if TYPE_CHECKING:
    from pix2seq.data.loaders import DetectionData


METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")


class NonFiniteLossError(Pix2SeqError, RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0
    step_in_epoch: int = 0  # batches of `epoch` already consumed
    global_step: int = 0
    elapsed_s: float = 0.0  # training wall clock, summed over resumptions
    best_metric: float = -1.0
    history: dict[str, list] = field(default_factory=dict)
    # saved before every evaluation: a run resumed from such a checkpoint evaluates first
    eval_pending: bool = False


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def move_batch(batch: dict, device: torch.device) -> dict:
    non_blocking = device.type == "cuda"
    return {
        k: (v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v) for k, v in batch.items()
    }


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    schedule: WarmupLinearSchedule,
    cfg: Config,
    state: TrainState,
    device: torch.device,
    clock_start: float,
    on_step: Callable[[dict], None] | None = None,
    on_checkpoint: Callable[[], None] | None = None,
    num_batches: int | None = None,
    pause: Callable[[float], bool] | None = None,
) -> dict[str, float]:
    """Train until the epoch's batches or the budget run out; ``state`` is advanced in place.

    ``loader`` must already start at batch ``state.step_in_epoch`` (the sampler skips the rest), so a
    resumed epoch sees exactly the batches an uninterrupted one would.

    Args:
        clock_start: a virtual ``time.perf_counter()`` origin such that ``perf_counter() - clock_start``
            is the training time so far, earlier runs of a resumed training included.
        on_step: receives the step's logged values (rank 0 logs them).
        on_checkpoint: called every ``train.checkpoint_every_steps`` optimizer steps.
        pause: called with the agreed clock after every step; True leaves the epoch early (an
            evaluation is due); the caller continues it later from ``state.step_in_epoch``.
    Returns:
        ``{"loss": mean loss, "images_per_s": ..., "steps": optimizer steps taken}``.
    """
    tcfg = cfg.train
    model.train()
    amp = autocast_dtype(tcfg.amp, device)
    accum = tcfg.accumulate
    loss_sum, loss_n, images, steps = 0.0, 0, 0, 0
    t_epoch = time.perf_counter()
    total = num_batches if num_batches is not None else (len(loader) if hasattr(loader, "__len__") else None)
    bar = tqdm(
        loader,
        total=total,
        desc=f"epoch {state.epoch}",
        unit="batch",
        leave=False,
        disable=not dist.is_main(),
        initial=state.step_in_epoch,
    )
    micro = 0
    t_step = time.perf_counter()
    for batch in bar:
        batch = move_batch(batch, device)
        last_micro = (micro + 1) % accum == 0
        sync = contextlib.nullcontext()
        if not last_micro and hasattr(model, "no_sync"):
            sync = model.no_sync()
        with sync:
            with _autocast(device, amp):
                logits = model(batch["image"], batch["input_tokens"])
            loss = criterion(logits.float(), batch["target_tokens"], batch["token_weights"])
            if dist.get_world_size() > 1:
                # sum(w*CE)/sum(w) over the *global* batch: DDP averages gradients over ranks, so
                # weigh each rank by its share of the token weights (exactly one big batch)
                w_local = batch["token_weights"].sum()
                loss = loss * (w_local / dist.all_reduce_mean(w_local.detach().clone()))
            (loss / accum).backward()
        micro += 1
        images += batch["image"].shape[0]
        if not last_micro:
            continue
        grad_norm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), tcfg.grad_clip if tcfg.grad_clip > 0 else float("inf")
        )
        # one collective agrees on the loss (for the NaN guard and logging) and the clock
        now = time.perf_counter() - clock_start
        agreed = dist.all_reduce_mean(
            torch.stack([loss.detach().double(), torch.tensor(now, dtype=torch.float64, device=loss.device)])
        )
        loss_val, clock = float(agreed[0]), float(agreed[1])
        if not math.isfinite(loss_val):
            raise NonFiniteLossError(
                f"non-finite loss ({loss_val}) at step {state.global_step + 1} "
                f"(epoch {state.epoch}, batch {state.step_in_epoch + 1}); stopping before the optimizer step"
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.global_step += 1
        state.step_in_epoch += accum
        state.elapsed_s = clock
        schedule.step(elapsed_s=clock)
        steps += 1
        loss_sum += loss_val
        loss_n += 1
        dt = time.perf_counter() - t_step
        t_step = time.perf_counter()
        if on_step is not None and (state.global_step % tcfg.log_every_steps == 0 or state.global_step == 1):
            on_step(
                {
                    "loss": loss_val,
                    "lr": optimizer.param_groups[-1]["lr"],
                    "grad_norm": float(grad_norm),
                    "images_per_s": images * dist.get_world_size() / max(time.perf_counter() - t_epoch, 1e-9),
                    "step_time_s": dt,
                }
            )
        bar.set_postfix(loss=f"{loss_val:.3f}", lr=f"{optimizer.param_groups[-1]['lr']:.2e}")
        if on_checkpoint is not None and state.global_step % tcfg.checkpoint_every_steps == 0:
            on_checkpoint()
        if schedule.done() or (pause is not None and pause(clock)):
            break
    bar.close()
    seconds = time.perf_counter() - t_epoch
    return {
        "loss": loss_sum / max(loss_n, 1),
        "images_per_s": images * dist.get_world_size() / max(seconds, 1e-9),
        "steps": float(steps),
    }


def eval_batch_size(requested: int, device: torch.device, image_size: int = 640) -> int:
    """``eval.batch_size``, or for 0 (auto) a size for the device: 16 on a CPU (the per-image
    decode time stops falling past it: ``make bench``'s batch 1 / 8 / 16 rows), on CUDA as many
    images as half the device memory holds at an estimated 256 MiB per 640 px image (the encoder's
    activations dominate; decoding caches are ~6 MiB), a power of two in [8, 256]."""
    if requested > 0:
        return requested
    if device.type != "cuda":
        return 16
    total = torch.cuda.get_device_properties(device).total_memory
    per_image = 256 * 2**20 * (image_size / 640) ** 2
    fits = int(total / 2 / per_image)
    return max(8, min(256, 2 ** max(fits.bit_length() - 1, 0)))


@torch.inference_mode()
def predict_batches(
    model: nn.Module,
    loader: Iterable,
    vocab: Vocab,
    cfg: Config,
    device: torch.device,
    label_to_category: list[int],
    keep_images: int = 0,
) -> tuple[list[dict], list[int], list[dict]]:
    """Decode every batch of ``loader`` (this rank's shard).

    The loader's workers prefetch the next batches while the model decodes; each batch's
    post-processing (to host, boxes in original pixels, COCO records) runs on a second thread while
    the next batch decodes. The progress bar counts images (images/s).

    Returns:
        COCO result dicts, the image ids seen, and up to ``keep_images`` samples
        ({image, pred, gt}) for the prediction grid.
    """
    model.eval()
    precision = choose_precision(cfg.train.amp, device)
    results: list[dict] = []
    seen: list[int] = []
    samples: list[dict] = []

    def finish(decoded: Decoded, batch: dict) -> None:
        dets = decoded.detections()
        ids = [int(i) for i in batch["image_id"]]
        results.extend(detections_to_coco(ids, dets, label_to_category))
        seen.extend(ids)
        for j in range(min(len(ids), keep_images - len(samples))):
            s = float(batch["scale"][j])
            samples.append(
                {
                    "image": batch["image"][j].cpu(),
                    "pred": {k: v.clone() for k, v in dets[j].items()},
                    "gt_boxes": batch["boxes"][j] / s,
                    "gt_labels": batch["labels"][j],
                    "scale": s,
                }
            )

    sampler = getattr(loader, "sampler", None)
    total = len(sampler) if sampler is not None and hasattr(sampler, "__len__") else None
    bar = tqdm(total=total, desc="evaluate", unit="img", leave=False, disable=not dist.is_main())
    pending: Future | None = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pix2seq-postprocess") as post:
        for batch in loader:
            images = batch["image"].to(device, non_blocking=device.type == "cuda")
            decoded = decode(model, images, vocab, cfg, batch["scale"], batch["orig_size"], precision)
            if decoded.compile_s:
                tqdm.write(f"evaluate: decode step built in {decoded.compile_s:.1f} s (once per batch shape)")
            if pending is not None:
                pending.result()
            pending = post.submit(finish, decoded, batch)
            bar.update(images.shape[0])
        if pending is not None:
            pending.result()
    bar.close()
    return results, seen, samples


def evaluate_model(
    model: nn.Module,
    data: DetectionData,
    vocab: Vocab,
    cfg: Config,
    device: torch.device,
    keep_images: int = 0,
) -> tuple[dict[str, float], CocoResult | None, list[dict]]:
    """Distributed inference (each rank its shard) and COCO AP on rank 0.

    Returns metrics (0-100; empty on other ranks), the full CocoResult (rank 0) and visual samples.
    """
    loader = data.val_loader(eval_batch_size(cfg.eval.batch_size, device, cfg.data.image_size))
    results, seen, samples = predict_batches(
        model, loader, vocab, cfg, device, data.label_to_category, keep_images=keep_images
    )
    gathered = dist.all_gather_object((results, seen))
    if not dist.is_main():
        return {}, None, []
    all_results, all_ids, dup = [], set(), set()
    for res, ids in gathered:
        # DistributedSampler pads the last shard with repeated images: keep one copy of each
        fresh = set(ids) - all_ids
        dup |= set(ids) & all_ids
        all_results.extend(r for r in res if r["image_id"] in fresh)
        all_ids |= set(ids)
    result = coco_evaluate(
        data.val_annotations, all_results, backend=cfg.eval.backend, img_ids=sorted(all_ids)
    )
    metrics = {k: float(result.metrics[k]) for k in METRIC_KEYS}
    return metrics, result, samples

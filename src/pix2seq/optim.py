"""AdamW with the seed's parameter groups, and the warmup + linear-decay schedule.

The schedule is a function of training *progress* in [0, 1]: steps done / total steps for an
epoch budget, or elapsed / budget for a wall-clock budget (``train.max_minutes``). Stepping per
iteration keeps it the seed's schedule; its state is two numbers, saved with every checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pix2seq.config import TrainConfig


def _no_decay(name: str, p: nn.Parameter) -> bool:
    """Norm weights, biases, embeddings and position tables get no weight decay."""
    return p.ndim <= 1 or "embed" in name or "pos" in name.split(".")[-1] or name.endswith("position")


def param_groups(model: nn.Module, tcfg: TrainConfig) -> list[dict]:
    """Four groups: (backbone | rest) x (decay | no decay); the backbone's lr is scaled."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (name.startswith("backbone.") or ".backbone." in name, _no_decay(name, p))
        groups.setdefault(key, []).append(p)
    out = []
    for (is_backbone, no_decay), params in sorted(groups.items()):
        lr = tcfg.lr * (tcfg.backbone_lr_mult if is_backbone else 1.0)
        out.append(
            {
                "params": params,
                "lr": lr,
                "initial_lr": lr,
                "weight_decay": 0.0 if no_decay else tcfg.weight_decay,
                "name": ("backbone" if is_backbone else "transformer") + ("_no_decay" if no_decay else ""),
            }
        )
    return out


def build_optimizer(model: nn.Module, tcfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # fused kernels exist for CUDA and CPU (measured here, 7.2 M parameters, 1 thread: 9.6 ms a step
    # against 30 ms for the default per-tensor loop)
    fused = bool(tcfg.fused_adamw and device.type in ("cuda", "cpu"))
    return torch.optim.AdamW(param_groups(model, tcfg), lr=tcfg.lr, betas=tuple(tcfg.betas), fused=fused)


def lr_factor(progress: float, warmup: float, final: float) -> float:
    """Linear warmup from 0 over ``warmup`` (a fraction of training), then linear decay to ``final``."""
    progress = min(max(progress, 0.0), 1.0)
    if warmup > 0 and progress < warmup:
        return progress / warmup
    rest = (progress - warmup) / max(1.0 - warmup, 1e-12)
    return 1.0 - (1.0 - final) * rest


@dataclass
class WarmupLinearSchedule:
    """Per-iteration schedule over a step budget or a wall-clock budget (seconds)."""

    optimizer: torch.optim.Optimizer
    total_steps: int
    warmup: float  # fraction of training
    final: float = 0.0
    budget_s: float = 0.0  # > 0: progress is elapsed / budget_s instead of step / total_steps
    step_count: int = 0
    elapsed_s: float = 0.0

    def progress(self) -> float:
        if self.budget_s > 0:
            return self.elapsed_s / self.budget_s
        return self.step_count / max(self.total_steps, 1)

    def apply(self) -> float:
        f = lr_factor(self.progress(), self.warmup, self.final)
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * f
        return f

    def step(self, elapsed_s: float | None = None) -> None:
        self.step_count += 1
        if elapsed_s is not None:
            self.elapsed_s = elapsed_s
        self.apply()

    def done(self) -> bool:
        return self.progress() >= 1.0

    def state_dict(self) -> dict:
        return {
            "step_count": self.step_count,
            "elapsed_s": self.elapsed_s,
            "total_steps": self.total_steps,
            "budget_s": self.budget_s,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.elapsed_s = float(state["elapsed_s"])
        self.apply()


def build_schedule(
    optimizer: torch.optim.Optimizer, tcfg: TrainConfig, steps_per_epoch: int
) -> WarmupLinearSchedule:
    total = max(1, tcfg.epochs * steps_per_epoch)
    if tcfg.warmup_fraction > 0:
        warmup = tcfg.warmup_fraction
    else:
        warmup = min(tcfg.warmup_epochs / max(tcfg.epochs, 1), 0.99)
    sched = WarmupLinearSchedule(
        optimizer, total, warmup, tcfg.final_lr_fraction, budget_s=tcfg.max_minutes * 60.0
    )
    sched.apply()
    return sched

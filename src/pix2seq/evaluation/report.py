"""The evaluate stage: a trained model on the validation split -> metrics, tables and plots.

Outputs in ``eval.output_dir`` (DVC metrics and plots, ``dvc.yaml``): ``metrics.json`` (AP, AP50,
AP75, APs, APm, APl, AR100 on 0-100, plus decoding speed), ``per_class.csv`` (a bar chart) and
``per_class.md``, ``pr_curve.csv`` (runs overlay in ``dvc plots diff``) and ``pr_curve.png``, and
``predictions.png`` (validation images with predicted and true boxes). Everything is also logged to
the training's MLflow run (the run id kept in ``train.output_dir``) with the ``eval/`` prefix, so a
run's page holds its final evaluation next to the ``val/`` curve of training.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pix2seq import distributed as dist
from pix2seq.atomic import atomic_write_text
from pix2seq.checkpoint import (
    MODEL_ENTRIES,
    CheckpointError,
    CheckpointManager,
    config_from_checkpoint,
    load_checkpoint,
)
from pix2seq.config import Config, untracked
from pix2seq.data.loaders import load_detection_data
from pix2seq.engine import evaluate_model
from pix2seq.errors import Pix2SeqError
from pix2seq.evaluation.plots import (
    plot_pr_curve,
    prediction_grid,
    save_image,
    write_per_class_table,
    write_pr_curve_csv,
)
from pix2seq.model import build_model
from pix2seq.precision import use_channels_last
from pix2seq.tracking import RunTracker, readable_run_name
from pix2seq.vocab import Vocab
from pix2seq.weights.official import local_model_file


class EvaluationError(Pix2SeqError):
    """Nothing to evaluate, or a model that does not fit the dataset."""


def checkpoint_for(cfg: Config) -> Path:
    """``eval.checkpoint`` (a path or ``official:NAME``), else the exported best model, else the
    best/last training checkpoint."""
    if cfg.eval.checkpoint:
        return local_model_file(cfg.eval.checkpoint)
    exported = Path(cfg.train.output_dir) / "model.pt"
    if exported.exists():
        return exported
    return CheckpointManager(Path(cfg.train.output_dir) / "checkpoints").best_or_last_path


def load_trained_model(cfg: Config, path: Path) -> tuple[nn.Module, Vocab, Config, dict[str, Any]]:
    """``(model, vocab, config, checkpoint)``: the checkpoint's network on the CPU, its vocabulary,
    and its stored model/tokenizer config with ``cfg``'s data and evaluation settings. Only the latter
    come from params.yaml: reads of the others are not recorded (:func:`pix2seq.config.untracked`)."""
    ckpt = load_checkpoint(path, map_location="cpu", required=MODEL_ENTRIES)
    current = cfg.to_dict()
    mcfg = config_from_checkpoint(ckpt, path, replace={"data": current["data"], "eval": current["eval"]})
    untracked(mcfg, mcfg.model, mcfg.tokenizer, mcfg.train, mcfg.tune, mcfg.tracking)
    vocab = Vocab(**ckpt["vocab"])
    model, _ = build_model(mcfg, vocab)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(
            f"{path}: its weights do not fit the network its config builds ({first})"
        ) from None
    return model, vocab, mcfg, ckpt


def run_evaluation(cfg: Config) -> dict[str, float]:
    """The stage (every rank decodes its shard; rank 0 scores, writes and logs). Returns the metrics."""
    info = dist.init_distributed()
    path = checkpoint_for(cfg)
    if not path.exists():
        raise EvaluationError(
            f"{path}: no model to evaluate; train first (dvc repro train) or set eval.checkpoint"
        )
    model, vocab, mcfg, ckpt = load_trained_model(cfg, path)
    model.to(info.device)
    if use_channels_last(mcfg.train.amp, info.device):
        model.to(memory_format=torch.channels_last)  # the encoder's convolutions run faster
    data = load_detection_data(mcfg, distributed=info.world_size > 1)
    if data.num_classes != vocab.num_classes:
        raise EvaluationError(
            f"{path}: the model knows {vocab.num_classes} categories, the prepared dataset in "
            f"{cfg.data.prepared_dir} has {data.num_classes}; evaluate it on the data it was trained on"
        )
    if vocab.layout == "official" and list(vocab.category_ids) != data.label_to_category:
        raise EvaluationError(
            f"{path}: the model's category ids {list(vocab.category_ids)[:5]}... differ from the "
            f"dataset's {data.label_to_category[:5]}... (official vocabulary: class token = 100 + id)"
        )
    t0 = time.perf_counter()
    metrics, result, samples = evaluate_model(
        model, data, vocab, mcfg, info.device, keep_images=cfg.eval.num_vis
    )
    seconds = time.perf_counter() - t0
    if not info.is_main:
        return {}
    out = Path(cfg.eval.output_dir)
    n_images = len(result.img_ids)
    report = {
        **metrics,
        "images": n_images,
        "images_per_s": n_images / max(seconds, 1e-9),
        "global_step": int(ckpt.get("global_step", 0)),
    }
    atomic_write_text(out / "metrics.json", json.dumps(report, indent=2) + "\n")
    write_per_class_table(result, out / "per_class.md", out / "per_class.csv")
    write_pr_curve_csv(result, out / "pr_curve.csv")
    plot_pr_curve(result, out / "pr_curve.png")
    if samples:
        save_image(prediction_grid(samples, [c["name"] for c in data.categories]), out / "predictions.png")
    log_to_training_run(cfg, out, report, path)
    return metrics


def log_to_training_run(cfg: Config, out: Path, report: dict[str, Any], checkpoint: Path) -> None:
    """The evaluation on the MLflow run of the training that produced it (``eval/`` metrics at the
    checkpoint's step, the report files under ``evaluation/``); a new run when there is none."""
    run_id_file = Path(cfg.train.output_dir) / "mlflow_run_id"
    tracker = RunTracker(
        cfg,
        run_id_file=run_id_file,
        resume=run_id_file.exists(),
        log_system_metrics=False,
        run_name=readable_run_name("evaluate"),
        tags={"eval.checkpoint": str(checkpoint)},
    )
    with tracker:
        numbers = {
            f"eval/{k}": v for k, v in report.items() if isinstance(v, int | float) and k != "global_step"
        }
        tracker.log_metrics(numbers, step=report["global_step"])
        for f in sorted(out.iterdir()):
            if f.is_file():
                tracker.log_artifact(f, "evaluation")


def describe(metrics: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.1f}" for k, v in metrics.items())

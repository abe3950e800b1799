"""Report artefacts: PR curves, per-class tables, prediction grids, training curves.

Matplotlib runs headless (``Agg``); every writer creates the parent directory and writes
atomically where the file is text, so DVC ``plots``/``metrics`` never read half a file.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # before pyplot; harmless if already Agg

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from pix2seq.config import atomic_write_text  # noqa: E402

if TYPE_CHECKING:
    from pix2seq.evaluation.coco import CocoResult

__all__ = ["draw_detections", "plot_metric_curves", "plot_pr_curve", "save_grid", "write_per_class_table"]

PathLike = str | os.PathLike[str]

_GT_COLOR = (0, 255, 0)
_PALETTE = [  # tab10 as RGB
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]  # fmt: skip


def _prepare(path: PathLike) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def _save_fig(fig: Any, path: PathLike, dpi: int = 120) -> Path:
    p = _prepare(path)
    tmp = p.with_name(f".{p.name}.tmp{p.suffix}")
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        os.replace(tmp, p)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return p


# ------------------------------------------------------------------------------------- curves


def plot_pr_curve(result: CocoResult, path: PathLike, per_class: bool = True, max_classes: int = 20) -> Path:
    """Precision-recall curves: the class mean at IoU 0.5 and over 0.50:0.95 (bold), plus (thin)
    each category at IoU 0.5 when ``per_class`` and there are at most ``max_classes`` categories."""
    r = np.asarray(result.recall_thresholds)
    fig, ax = plt.subplots(figsize=(6, 5))
    if per_class and len(result.category_ids) <= max_classes:
        names = {c["category_id"]: c["name"] for c in result.per_class}
        for k, cid in enumerate(result.category_ids):
            pk = np.asarray(result.precision_per_class_iou50[k])
            if (pk > -1).any():
                ax.plot(r, np.clip(pk, 0, 1), lw=0.8, alpha=0.6, label=f"{names.get(cid, cid)} @.5")
    m50, mm = np.asarray(result.precision_iou50), np.asarray(result.precision_mean)
    ax.plot(
        r, np.clip(m50, 0, 1), lw=2.5, color="black", label=f"mean @.5 (AP50 {result.metrics['AP50']:.1f})"
    )
    ax.plot(
        r,
        np.clip(mm, 0, 1),
        lw=2.5,
        ls="--",
        color="black",
        label=f"mean @.5:.95 (AP {result.metrics['AP']:.1f})",
    )
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="Precision-recall")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    return _save_fig(fig, path)


def plot_metric_curves(
    history: Mapping[str, Sequence[tuple[float, float]]], path: PathLike, ncols: int = 3
) -> Path:
    """One panel per series: ``{"train/loss": [(step, value), ...], "val/AP": [...]}``.

    Series whose name contains ``loss`` get a log y-axis when all values are positive.
    """
    names = [k for k, v in history.items() if len(v) > 0]
    n = max(len(names), 1)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    if not names:
        axes.flat[0].text(0.5, 0.5, "no data", ha="center", va="center")
    for ax, name in zip(axes.flat, names, strict=False):
        pts = sorted((float(s), float(v)) for s, v in history[name])
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3)
        if "loss" in name.lower() and min(ys) > 0:
            ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save_fig(fig, path)


# -------------------------------------------------------------------------------------- tables


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "n/a" if x < 0 else f"{x:.2f}"
    return str(x)


def write_per_class_table(result: CocoResult, path_md: PathLike | None, path_csv: PathLike | None) -> None:
    """Per-category AP/AP50/AP75 and counts as Markdown (sorted by AP, best first) and CSV (by id).

    Undefined values (``-1``: no ground truth) are ``n/a`` in Markdown and empty in CSV.
    """
    cols = ["category_id", "name", "AP", "AP50", "AP75", "num_gt", "num_dets"]
    rows = [{c: row.get(c, "") for c in cols} for row in result.per_class]
    if path_md is not None:
        lines = [
            f"| {' | '.join(cols)} |",
            "|" + "|".join("---:" if c not in ("name",) else "---" for c in cols) + "|",
        ]
        for row in sorted(rows, key=lambda r: -float(r["AP"]) if isinstance(r["AP"], float) else 0.0):
            lines.append("| " + " | ".join(_fmt(row[c]) for c in cols) + " |")
        m = result.metrics
        lines.append("")
        lines.append(
            f"Overall: AP {_fmt(m['AP'])}, AP50 {_fmt(m['AP50'])}, AP75 {_fmt(m['AP75'])} ({result.backend})"
        )
        atomic_write_text(path_md, "\n".join(lines) + "\n")
    if path_csv is not None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for row in sorted(rows, key=lambda r: r["category_id"]):
            w.writerow({c: ("" if isinstance(v, float) and v < 0 else v) for c, v in row.items()})
        atomic_write_text(path_csv, buf.getvalue())


# ------------------------------------------------------------------------------------- images


def _boxes_tensor(boxes: Any, h: int, w: int) -> torch.Tensor:
    b = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4).clone()
    b[:, 0::2] = b[:, 0::2].clamp(0, w - 1)
    b[:, 1::2] = b[:, 1::2].clamp(0, h - 1)
    x0, x1 = torch.minimum(b[:, 0], b[:, 2]), torch.maximum(b[:, 0], b[:, 2])
    y0, y1 = torch.minimum(b[:, 1], b[:, 3]), torch.maximum(b[:, 1], b[:, 3])
    return torch.stack([x0, y0, x1, y1], dim=1)


def draw_detections(
    image: torch.Tensor,
    boxes: Any,
    labels: Any,
    scores: Any,
    gt_boxes: Any = None,
    gt_labels: Any = None,
    names: Sequence[str] | Mapping[int, str] | None = None,
    score_thresh: float = 0.3,
    width: int = 2,
) -> torch.Tensor:
    """Ground truth (green, thin) and predictions with ``score >= score_thresh`` (class colours,
    ``name score``) drawn on a uint8 ``(3, H, W)`` image (or a float one in [0, 1], the canvas of
    ``model.pixels: official``); returns a new uint8 image.

    Boxes are xyxy in the image's pixels; ``labels`` are contiguous 0..C-1 indices into ``names``.
    """
    from torchvision.utils import draw_bounding_boxes

    if image.is_floating_point():
        image = (image.detach().clamp(0, 1) * 255).round().to(torch.uint8)
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(
            f"draw_detections: need a uint8 (3,H,W) image, got {tuple(image.shape)} {image.dtype}"
        )
    img = image.detach().cpu()
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1).contiguous()
    h, w = img.shape[1:]

    def name(lab: int) -> str:
        if names is None:
            return str(lab)
        try:
            return str(names[lab])
        except (IndexError, KeyError):
            return str(lab)

    if gt_boxes is not None and len(gt_boxes) > 0:
        gb = _boxes_tensor(gt_boxes, h, w)
        gl = (
            [name(int(x)) for x in torch.as_tensor(gt_labels).reshape(-1).tolist()]
            if gt_labels is not None
            else None
        )
        img = draw_bounding_boxes(img, gb, labels=gl, colors=[_GT_COLOR] * len(gb), width=max(1, width - 1))

    if boxes is not None and len(boxes) > 0:
        pb = _boxes_tensor(boxes, h, w)
        pl = torch.as_tensor(labels).reshape(-1).long().tolist()
        ps = torch.as_tensor(scores, dtype=torch.float32).reshape(-1).tolist()
        keep = [i for i, s in enumerate(ps) if s >= score_thresh]
        if keep:
            img = draw_bounding_boxes(
                img,
                pb[keep],
                labels=[f"{name(pl[i])} {ps[i]:.2f}" for i in keep],
                colors=[_PALETTE[pl[i] % len(_PALETTE)] for i in keep],
                width=width,
            )
    return img


def save_grid(images: Sequence[torch.Tensor], path: PathLike, nrow: int = 4, padding: int = 2) -> Path:
    """Tile uint8 ``(3, H, W)`` images (sizes may differ: padded to the largest) into one PNG/JPEG."""
    from torchvision.utils import make_grid

    p = _prepare(path)
    if len(images) == 0:
        raise ValueError("save_grid: no images")
    hmax = max(int(im.shape[-2]) for im in images)
    wmax = max(int(im.shape[-1]) for im in images)
    padded = []
    for im in images:
        im = im.detach().cpu()
        if im.shape[0] == 1:
            im = im.expand(3, -1, -1)
        canvas = torch.zeros((3, hmax, wmax), dtype=torch.uint8)
        canvas[:, : im.shape[1], : im.shape[2]] = im
        padded.append(canvas)
    grid = make_grid(padded, nrow=max(1, nrow), padding=padding)
    arr = grid.permute(1, 2, 0).contiguous().numpy()
    tmp = p.with_name(f".{p.name}.tmp{p.suffix}")
    try:
        Image.fromarray(arr).save(tmp)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return p

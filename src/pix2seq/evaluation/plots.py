"""Report artefacts: PR curves (PNG and CSV), per-class tables, prediction grids.

Matplotlib (slow to import) is loaded by the PNG plots only, and runs headless (``Agg``); every
writer creates the parent directory and writes atomically, so DVC ``plots``/``metrics`` and MLflow
never read half a file.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from pix2seq.atomic import atomic_path, atomic_write_text

if TYPE_CHECKING:
    from pix2seq.evaluation.coco import CocoResult

__all__ = [
    "draw_detections",
    "plot_pr_curve",
    "prediction_grid",
    "save_figure",
    "save_grid",
    "save_image",
    "write_per_class_table",
    "write_pr_curve_csv",
]

PathLike = str | os.PathLike[str]

_GT_COLOR = (0, 255, 0)
_PALETTE = [  # tab10 as RGB
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]  # fmt: skip


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # before pyplot; harmless if already Agg
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: PathLike, dpi: int = 120) -> Path:
    """A matplotlib figure as an image file (format from the suffix), written atomically, then closed."""
    plt = _pyplot()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)


# ------------------------------------------------------------------------------------- curves


def plot_pr_curve(result: CocoResult, path: PathLike, per_class: bool = True, max_classes: int = 20) -> Path:
    """Precision-recall curves: the class mean at IoU 0.5 and over 0.50:0.95 (bold), plus (thin)
    each category at IoU 0.5 when ``per_class`` and there are at most ``max_classes`` categories."""
    r = np.asarray(result.recall_thresholds)
    fig, ax = _pyplot().subplots(figsize=(6, 5))
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
    return save_figure(fig, path)


def write_pr_curve_csv(result: CocoResult, path: PathLike) -> Path:
    """The class-mean precision-recall curves as CSV (``recall, precision_iou50, precision_iou50_95``),
    a DVC plot that overlays runs (``dvc plots diff``); undefined precision is left empty."""
    rows = ["recall,precision_iou50,precision_iou50_95"]
    for r, p50, pm in zip(
        result.recall_thresholds, result.precision_iou50, result.precision_mean, strict=True
    ):
        rows.append(",".join([f"{float(r):.2f}", *("" if v < 0 else f"{float(v):.6f}" for v in (p50, pm))]))
    return atomic_write_text(path, "\n".join(rows) + "\n")


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


def prediction_grid(
    samples: Sequence[Mapping[str, Any]], names: Sequence[str], nrow: int = 4
) -> torch.Tensor:
    """Validation samples (``evaluate_model(..., keep_images=N)``) with predicted (class colours,
    score >= 0.3) and true (green) boxes, tiled into one uint8 ``(3, H, W)`` image."""
    drawn = [
        draw_detections(
            s["image"],
            s["pred"]["boxes"] * s["scale"],
            s["pred"]["labels"],
            s["pred"]["scores"],
            s["gt_boxes"] * s["scale"],
            s["gt_labels"],
            names,
            score_thresh=0.3,
        )
        for s in samples
    ]
    return _tile(drawn, nrow)


def save_grid(images: Sequence[torch.Tensor], path: PathLike, nrow: int = 4, padding: int = 2) -> Path:
    """Tile uint8 ``(3, H, W)`` images (sizes may differ: padded to the largest) into one PNG/JPEG."""
    return save_image(_tile(images, nrow, padding), path)


def _tile(images: Sequence[torch.Tensor], nrow: int = 4, padding: int = 2) -> torch.Tensor:
    from torchvision.utils import make_grid

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
    return make_grid(padded, nrow=max(1, nrow), padding=padding)


def save_image(image: torch.Tensor, path: PathLike) -> Path:
    """A uint8 ``(3, H, W)`` image to a PNG/JPEG file (format from the suffix), atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(tmp)
    return Path(path)

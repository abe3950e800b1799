"""COCO evaluation (:mod:`.coco`) and report plots (:mod:`.plots`, imported lazily: matplotlib is slow)."""

from __future__ import annotations

from typing import Any

from pix2seq.evaluation.coco import METRIC_NAMES, CocoResult, coco_evaluate, detections_to_coco, load_coco_gt

_PLOTS = (
    "draw_detections",
    "plot_pr_curve",
    "save_grid",
    "save_image",
    "write_per_class_table",
    "write_pr_curve_csv",
)

__all__ = ["METRIC_NAMES", "CocoResult", "coco_evaluate", "detections_to_coco", "load_coco_gt", *_PLOTS]


def __getattr__(name: str) -> Any:
    if name in _PLOTS:
        from pix2seq.evaluation import plots

        return getattr(plots, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

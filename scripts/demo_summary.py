"""Print what `make demo` produced: held-out AP, what the tuning study compared and found, the
wall time, and the pictures to open (every path it prints exists).

    python scripts/demo_summary.py [START_EPOCH_SECONDS]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from pix2seq.config import load_config
from pix2seq.errors import run_entry_point
from pix2seq.tuning.report import PLOTS, format_report


def summary() -> None:
    started = float(sys.argv[1]) if len(sys.argv) > 1 else None
    cfg = load_config("params.yaml")
    metrics = json.loads((Path(cfg.eval.output_dir) / "metrics.json").read_text())
    train = json.loads((Path(cfg.train.output_dir) / "train_summary.json").read_text())
    print("\n=== Stable-Pix2Seq demo ===")
    print(
        f"trained {train['train_minutes']:.1f} min ({train['global_step']} steps); held-out generated shapes: "
        + "  ".join(f"{k} {metrics[k]:.1f}" for k in ("AP", "AP50", "AP75", "AR100"))
    )
    tune = Path(cfg.tune.report_dir) / "summary.json"
    if tune.exists():
        print("\ntuning: " + format_report(json.loads(tune.read_text())))
        if json.loads(tune.read_text())["recommended"]:
            print("  (make train-best trains with the best trial's parameters)")
    if started:
        print(f"\nwall time: {(time.time() - started) / 60:.1f} min")
    pictures = [
        (
            Path(cfg.eval.output_dir) / "predictions.png",
            "validation images: predicted (colour) and true (green) boxes",
        ),
        (Path(cfg.eval.output_dir) / "pr_curve.png", "precision-recall curves"),
        *((Path(cfg.tune.report_dir) / f"{name}.png", "the tuning study") for name in PLOTS),
    ]
    print("\npictures (PNG):")
    for path, what in pictures:
        if path.exists():
            print(f"  {str(path):<42} {what}")
    print("more:")
    print("  make ui          MLflow runs, metrics, plots, registered model (http://127.0.0.1:5000)")
    print("  dvc exp show     params and metrics of this workspace")
    print("  dvc plots show   loss and AP curves, AP per class, PR curve -> dvc_plots/index.html")


def main() -> int:
    return run_entry_point("demo_summary", summary)


if __name__ == "__main__":
    sys.exit(main())

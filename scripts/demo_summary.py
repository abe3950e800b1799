"""Print what `make demo` produced: validation AP, the tuning study's best, and where to look."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from pix2seq.errors import run_entry_point


def summary() -> None:
    started = float(sys.argv[1]) if len(sys.argv) > 1 else None
    metrics = json.loads(Path("reports/eval/metrics.json").read_text())
    print("\n=== Stable-Pix2Seq demo ===")
    print(
        "validation (generated shapes, held-out):  "
        + "  ".join(f"{k} {metrics[k]:.1f}" for k in ("AP", "AP50", "AP75", "AR100"))
    )
    best = Path("reports/best_params.json")
    if best.exists():
        b = json.loads(best.read_text())
        print(
            f"tuning study '{b.get('study')}': best AP {b.get('AP', 0):.1f} with train.lr={b.get('train.lr'):.2e}, "
            f"train.batch_repeat={b.get('train.batch_repeat')}  (make train-best trains with them)"
        )
    if started:
        print(f"wall time: {(time.time() - started) / 60:.1f} min")
    print("look at it:")
    print(
        "  make ui                      MLflow runs, metrics, plots, registered model (http://127.0.0.1:5000)"
    )
    print("  dvc exp show                 params and metrics of this workspace")
    print("  dvc plots show               loss and AP curves, PR curve, predictions -> dvc_plots/index.html")
    print("  reports/eval/predictions.png validation images with predicted (colour) and true (green) boxes")


def main() -> int:
    return run_entry_point("demo_summary", summary)


if __name__ == "__main__":
    sys.exit(main())

"""DVC stage `train`: train Pix2Seq on the prepared data (torchrun on every local GPU).

python pipeline/train.py [key.sub=value ...]            # GPUS=N to choose the process count
torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29400 pipeline/train.py
"""

import argparse
import sys

from pix2seq.config import load_config
from pix2seq.launch import relaunch_under_torchrun
from pix2seq.training import run_training


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value")
    args = parser.parse_args(argv)
    cfg = load_config(args.params, args.overrides)  # fail on a bad key before starting processes
    relaunch_under_torchrun(__file__, argv)
    result = run_training(cfg)
    if result.run_id:
        print(f"best AP {result.best_ap:.1f}; MLflow run {result.run_id}")


if __name__ == "__main__":
    main()

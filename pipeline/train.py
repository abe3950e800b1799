"""DVC stage `train`: train Pix2Seq on the prepared data (torchrun on every local GPU).

python pipeline/train.py [--params FILE] [key.sub=value ...]     # GPUS=N to choose the process count
torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29400 pipeline/train.py
"""

import sys

from pix2seq.config import config_from_argv
from pix2seq.errors import run_entry_point


def run(argv: list[str]) -> int:
    cfg = config_from_argv(argv, usage=__doc__)  # fail on a bad key before starting processes
    from pix2seq.launch import relaunch_under_torchrun
    from pix2seq.training import run_training

    relaunch_under_torchrun(__file__, argv)
    result = run_training(cfg)
    if result.run_id:
        print(f"best AP {result.best_ap:.1f}; MLflow run {result.run_id}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_entry_point("train", lambda: run(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())

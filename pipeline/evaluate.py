"""DVC stage `evaluate`: COCO AP of the best checkpoint on the validation split, with plots.

python pipeline/evaluate.py [key.sub=value ...]
"""

import sys

from pix2seq.config import config_from_argv
from pix2seq.evaluation.report import describe, run_evaluation
from pix2seq.launch import relaunch_under_torchrun


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cfg = config_from_argv(argv, usage=__doc__)
    relaunch_under_torchrun(__file__, argv)
    metrics = run_evaluation(cfg)
    if metrics:
        print(f"validation: {describe(metrics)}  ->  {cfg.eval.output_dir}/metrics.json")


if __name__ == "__main__":
    main()

"""DVC stage `evaluate`: COCO AP of the best checkpoint on the validation split, with plots.

python pipeline/evaluate.py [--params FILE] [key.sub=value ...]
"""

import sys

from pix2seq.config import config_from_argv
from pix2seq.errors import run_entry_point


def run(argv: list[str]) -> int:
    cfg = config_from_argv(argv, usage=__doc__)  # fail on a bad key before starting processes
    from pix2seq.evaluation.report import describe, run_evaluation
    from pix2seq.launch import relaunch_under_torchrun

    relaunch_under_torchrun(__file__, argv)
    metrics = run_evaluation(cfg)
    if metrics:
        print(f"validation: {describe(metrics)}  ->  {cfg.eval.output_dir}/metrics.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_entry_point("evaluate", lambda: run(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())

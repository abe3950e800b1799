"""DVC stage `evaluate`: COCO AP of the best checkpoint on the validation split, with plots.

python pipeline/evaluate.py [key.sub=value ...]
"""

import argparse
import sys

from pix2seq.config import load_config
from pix2seq.evaluation.report import describe, run_evaluation
from pix2seq.launch import relaunch_under_torchrun


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value")
    args = parser.parse_args(argv)
    cfg = load_config(args.params, args.overrides)
    relaunch_under_torchrun(__file__, argv)
    metrics = run_evaluation(cfg)
    if metrics:
        print(f"validation: {describe(metrics)}  ->  {cfg.eval.output_dir}/metrics.json")


if __name__ == "__main__":
    main()

"""DVC stage ``prepare``: validate the COCO-format dataset in data.root and write the manifests.

Usage: python pipeline/prepare.py [--params FILE] [key.sub=value ...]   (default params.yaml; logic in pix2seq.data.prepare)
Writes data.prepared_dir/<split>.json, data.prepared_dir/issues.json and reports/prepare.json.
"""

from __future__ import annotations

import logging
import sys

from pix2seq.config import config_from_argv
from pix2seq.errors import run_entry_point

REPORT = "reports/prepare.json"


def run(argv: list[str]) -> int:
    cfg = config_from_argv(argv, usage=__doc__)  # a bad key fails before the heavy imports
    from pix2seq.data.prepare import run_prepare

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = run_prepare(cfg, REPORT)
    splits = [k for k in report if isinstance(report[k], dict)]
    for s in splits:
        r = report[s]
        print(
            f"prepare: {s}: {r['images_kept']} images, {r['boxes_kept']} boxes ({r['images_bad']} bad images, "
            f"{r['boxes_dropped']} boxes dropped)"
        )
    print(f"prepare: report in {REPORT}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_entry_point("prepare", lambda: run(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())

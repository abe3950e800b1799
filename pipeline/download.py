"""DVC stage ``download``: COCO 2017 (data.source: coco) or the generated dataset, into data.root.

Usage: python pipeline/download.py [--params FILE] [key.sub=value ...]   (default params.yaml; logic in pix2seq.data.download)
"""

from __future__ import annotations

import logging
import sys

from pix2seq.config import config_from_argv
from pix2seq.errors import run_entry_point


def run(argv: list[str]) -> int:
    cfg = config_from_argv(argv, usage=__doc__)  # a bad key fails before the heavy imports
    from pix2seq.data.download import run_download

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = run_download(cfg)
    print(f"download: {summary['source']} dataset ready in {summary['root']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_entry_point("download", lambda: run(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())

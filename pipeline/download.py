"""DVC stage ``download``: COCO 2017 (data.source: coco) or the generated dataset, into data.root.

Usage: python pipeline/download.py [--params FILE] [key.sub=value ...]   (default params.yaml; logic in pix2seq.data.download)
"""

from __future__ import annotations

import logging
import sys

from pix2seq.config import ConfigError, config_from_argv
from pix2seq.data.download import DownloadError, run_download


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_argv(sys.argv[1:] if argv is None else argv)
        summary = run_download(cfg)
    except (ConfigError, DownloadError) as e:
        print(f"download: error: {e}", file=sys.stderr)
        return 1
    print(f"download: {summary['source']} dataset ready in {summary['root']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

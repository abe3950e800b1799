"""``python -m pix2seq.cli ...`` (what ``bin/pix2seq`` and torchrun run)."""

import sys

from pix2seq.cli import main

sys.exit(main())

"""``pix2seq weights ...``: the official Pix2Seq weights.

    pix2seq weights convert CKPT_PREFIX --arch resnet|resnet-c --image-size N --out model.pt

``convert`` reads an official TensorFlow checkpoint (a prefix such as ``resnet_640x640/ckpt-74844``
or its directory) and writes a model file that ``pix2seq predict --model``, ``eval.checkpoint`` and
serving accept (see :mod:`pix2seq.weights.convert`). It needs the ``official`` extra
(``tensorflow-cpu``). Exit status 0, or 2 with a one-line message.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

EXIT_ERROR = 2
ARCH_CHOICES = ("resnet", "resnet-c")


def cmd_convert(args: argparse.Namespace) -> int:
    from pix2seq.weights.convert import ConversionError, convert_checkpoint

    try:
        path = convert_checkpoint(args.checkpoint, args.arch, args.image_size, args.out)
    except ConversionError as e:
        print(f"pix2seq weights convert: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    print(f"wrote {path} ({args.arch}, {args.image_size} px, from {args.checkpoint})")
    return 0


def _image_size(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if n < 32:
        raise argparse.ArgumentTypeError(f"must be >= 32, got {n}")
    return n


def register(subparsers: Any) -> None:
    """Add ``weights`` (and its subcommands) to the ``pix2seq`` parser's ``subparsers``."""
    p = subparsers.add_parser("weights", help="the official Pix2Seq weights: convert a TensorFlow checkpoint")
    sub = p.add_subparsers(dest="weights_command", metavar="COMMAND", required=True)
    c = sub.add_parser(
        "convert",
        help="official TensorFlow checkpoint -> model file",
        description="Convert an official Pix2Seq TensorFlow checkpoint (google-research/pix2seq) into a "
        "model file for `pix2seq predict --model`, eval.checkpoint and serving. Needs the 'official' "
        "extra (uv sync --extra official).",
        epilog="example:\n  pix2seq weights convert resnet_640x640/ckpt-74844 --arch resnet --image-size 640 "
        "--out models/resnet_640.pt",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument(
        "checkpoint", metavar="CKPT_PREFIX", help="checkpoint prefix (dir/ckpt-N) or its directory"
    )
    c.add_argument("--arch", required=True, choices=ARCH_CHOICES, help="resnet (R50 C5) or resnet-c (R50 C4)")
    c.add_argument(
        "--image-size", required=True, type=_image_size, help="the input side in pixels (e.g. 640)"
    )
    c.add_argument("--out", required=True, help="the model file to write (e.g. model.pt)")
    c.set_defaults(func=cmd_convert)

"""``pix2seq weights ...``: the official Pix2Seq weights.

    pix2seq weights download NAME... [--cache-dir DIR] [--base-url URL] [--no-convert]
    pix2seq weights download --list
    pix2seq weights convert CKPT_PREFIX --arch resnet|resnet-c --image-size N --out model.pt

``download`` fetches, verifies and converts the named official checkpoints (see
:mod:`pix2seq.weights.official`) and prints each converted model file; ``official:NAME`` then
names it anywhere a model is expected (``pix2seq predict --model``, ``eval.checkpoint``,
``model.init_from``), without a separate download step.

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


def _table() -> str:
    from pix2seq.weights.official import BUCKET, MODELS

    rows = [f"{'name':<14}{'backbone':<16}{'image':>6}{'COCO AP':>9}  source"]
    for m in MODELS.values():
        rows.append(
            f"{m.name:<14}{m.backbone:<16}{m.image_size:>6}{m.published_ap:>9.1f}  gs://{BUCKET}/{m.folder}"
        )
    return "\n".join(rows) + "\n(COCO val2017 AP as published by the official README; not measured here)"


def cmd_download(args: argparse.Namespace) -> int:
    """Errors (unknown names, downloads, conversion) are Pix2SeqErrors: one line, exit status 2."""
    from pix2seq.weights import official

    if args.list:
        print(_table())
        return 0
    if not args.names:
        raise official.OfficialWeightsError(
            f"name a model to download; known: {', '.join(official.MODELS)} (or --list)"
        )
    for m in [official.lookup(n) for n in args.names]:
        if args.no_convert:
            path = official.download(m.name, cache_dir=args.cache_dir, url=args.base_url)
            print(f"{m.name}: TF checkpoint {path}")
        else:
            path = official.resolve(m.name, cache_dir=args.cache_dir, url=args.base_url)
            print(f"{m.name}: {path}  (use it as --model official:{m.name})")
    return 0


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
    p = subparsers.add_parser(
        "weights", help="the official Pix2Seq weights: download and convert their checkpoints"
    )
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
    d = sub.add_parser(
        "download",
        help="download, verify and convert official checkpoints (resnet_640, ...)",
        description="Download official checkpoints from the public bucket over HTTPS (resumable, "
        "MD5-verified, cached in $PIX2SEQ_OFFICIAL_CACHE or ~/.cache/pix2seq/official) and convert "
        "them into model files; print each file.",
        epilog="examples:\n"
        "  pix2seq weights download --list\n"
        "  pix2seq weights download resnet_640\n"
        "  pix2seq predict photos/ --model official:resnet_640",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument("names", nargs="*", metavar="NAME", help="official model names, e.g. resnet_640")
    d.add_argument("--list", action="store_true", help="list the known models and exit")
    d.add_argument("--cache-dir", default=None, help="cache folder (default $PIX2SEQ_OFFICIAL_CACHE)")
    d.add_argument(
        "--base-url",
        default=None,
        help="bucket host (default $PIX2SEQ_OFFICIAL_BASE_URL, else https://storage.googleapis.com)",
    )
    d.add_argument("--no-convert", action="store_true", help="download and verify only")
    d.set_defaults(func=cmd_download)

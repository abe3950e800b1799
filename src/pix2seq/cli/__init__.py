"""The ``pix2seq`` command line (console script ``pix2seq = pix2seq.cli:main``; ``bin/pix2seq`` runs
it with the repository's virtual environment, as the Makefile and the DVC stages do)::

    pix2seq download [--params FILE] [key.sub=value ...]   COCO, the generated set, or link your files
    pix2seq prepare  [--params FILE] [key.sub=value ...]   validate the dataset -> manifests
    pix2seq train    [--params FILE] [key.sub=value ...]   train (torchrun on every local GPU; GPUS=N)
    pix2seq eval     [--params FILE] [key.sub=value ...]   evaluate the trained model -> eval.output_dir
    pix2seq tune     [--params FILE] [--worker | --best-overrides] [key.sub=value ...]
    pix2seq predict  IMAGE|FOLDER... [--model SPEC] [--format json|coco] [key.sub=value ...]
    pix2seq weights  ...                                   (pix2seq.weights, where installed)
    pix2seq --version

A bad key, value, file or model fails with one line, ``pix2seq <command>: error: <message>``
(``train.lrr: unknown key; did you mean train.lr?``), and exit status 2; ``PIX2SEQ_DEBUG=1`` adds the
traceback. Subcommands are registered in :data:`COMMANDS`: a ``register(subparsers)`` function adds
a parser and sets ``func`` (``args -> exit status``) on it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pix2seq import __version__
from pix2seq.cli import predict, stages
from pix2seq.errors import run_entry_point

COMMANDS: list[Callable[[Any], None]] = [
    stages.register_download,
    stages.register_prepare,
    stages.register_train,
    stages.register_eval,
    stages.register_tune,
    predict.register,
]
try:  # the weights tools (pix2seq.weights), where present
    from pix2seq.weights.commands import register as register_weights
except ModuleNotFoundError as e:
    if e.name not in ("pix2seq.weights", "pix2seq.weights.commands"):
        raise
else:
    COMMANDS.append(register_weights)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pix2seq", description="Stable-Pix2Seq command line")
    parser.add_argument("--version", action="version", version=f"pix2seq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in COMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # positionals after options (`predict imgs/ --out x eval.decoding=beam`) come back as extras
    args, extra = parser.parse_known_args(argv)
    positional = getattr(args, "positional", None)
    unknown = [e for e in extra if e.startswith("-") and e != "-"]
    if unknown or (extra and positional is None):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        setattr(args, positional, [*getattr(args, positional), *extra])
    args.argv = argv[argv.index(args.command) + 1 :]  # the command's own arguments (torchrun relaunch)
    return run_entry_point(f"pix2seq {args.command}", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())

"""``pix2seq predict``: detect objects in image files and folders with a trained model.

    pix2seq predict IMAGE_OR_FOLDER... [--model SPEC] [--out DIR] [--format json|coco]
                    [--score-threshold 0.3] [--device auto|cpu|cuda|cuda:N] [--batch-size N]
                    [--tracking-uri URI] [key.sub=value ...]

``--model`` is a model file (``model.pt``, ``best.pt``), an MLflow model directory, an MLflow URI or
``official:NAME`` (:func:`pix2seq.tracking.resolve_model`). The default, ``models:/pix2seq@champion``,
is the champion of the one task that has one; with several tasks, name one
(``models:/pix2seq@champion-<task>``). The command says which model and task it used.

Folders are searched recursively for ``*.jpg``, ``*.jpeg`` and ``*.png``; files named explicitly are
read whatever their extension. ``--format json`` (default): ``DIR/detections.json`` gets one entry per
image (file, width, height, boxes xyxy in pixels, scores, labels, category_ids, names, and the
overlay's file name). ``--format coco``: ``DIR/detections.json`` is a COCO results list
(``image_id``, ``category_id``, ``bbox`` [x, y, w, h], ``score``); an image's id is its file name's
number (COCO's ``000000397133.jpg``), else its position in the input order (1, 2, ...). Either way
``DIR/<image>.png`` shows the image with the detections drawn. Detections below
``--score-threshold`` are left out. ``key.sub=value`` arguments override the model's stored config
(decoding only makes sense: ``eval.decoding=beam``, ``eval.beam_size=8``, ``tokenizer.max_instances=...``).

Exit status: 0 on success; 2 on an error, with a one-line message naming what failed: a missing
model or unknown model URI, an unavailable device, a bad override, no images, or unreadable
images (those are listed one per line and in ``detections.json``'s ``errors``; the readable images
are still processed and written).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pix2seq.errors import Pix2SeqError, first_line
from pix2seq.files import regular_file_problem

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
DEFAULT_MODEL = "models:/pix2seq@champion"
_OVERRIDE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)+=")


class CliError(Pix2SeqError):
    """A user-facing error of the predict command: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------------------- images


@dataclass
class ImageJob:
    path: Path  # as given / found
    out_name: str  # the overlay's file name inside --out


@dataclass
class Collected:
    jobs: list[ImageJob] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)  # (input, why)


def _unique(name: str, used: set[str]) -> str:
    stem, suffix = os.path.splitext(name)
    candidate, k = name, 1
    while candidate.lower() in used:
        k += 1
        candidate = f"{stem}-{k}{suffix}"
    used.add(candidate.lower())
    return candidate


def collect_images(inputs: Sequence[str]) -> Collected:
    """Files as given plus ``*.jpg|jpeg|png`` under folders (recursively, sorted), each once.

    Overlay names: ``<stem>.png`` for files, ``<path below the folder>.png`` for folder contents,
    made unique with ``-2``, ``-3``... suffixes."""
    out = Collected()
    seen: set[Path] = set()
    used: set[str] = {"detections.json"}

    def add(p: Path, rel: Path) -> None:
        key = p.resolve()
        if key in seen:
            return
        seen.add(key)
        out.jobs.append(ImageJob(p, _unique(str(rel.with_suffix(".png")), used)))

    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*")
                if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )  # fmt: skip
            if not found:
                out.missing.append(
                    (raw, f"no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} images in this folder")
                )
            for f in found:
                add(f, f.relative_to(p))
        elif p.exists() or p.is_symlink():
            problem = regular_file_problem(p)  # a FIFO or device is refused here, never opened
            if problem:
                out.missing.append((raw, problem))
            else:
                add(p, Path(p.name))
        else:
            out.missing.append((raw, "no such file or directory"))
    return out


def split_overrides(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Positional arguments -> (inputs, ``key.sub=value`` overrides); an existing path is an input."""
    inputs, overrides = [], []
    for a in args:
        if _OVERRIDE_RE.match(a) and not Path(a).exists():
            overrides.append(a)
        else:
            inputs.append(a)
    return inputs, overrides


# ---------------------------------------------------------------------------------------- predict


class _PyfuncBackend:
    """A pyfunc model without a pix2seq checkpoint artifact: fed base64 images through ``predict``."""

    def __init__(self, model_dir: Path) -> None:
        import mlflow.pyfunc

        self.model = mlflow.pyfunc.load_model(str(model_dir))
        self.names: list[str] | None = None
        self.batch_size = 8

    def predict(
        self, images: list[Any], raw: list[bytes], score_threshold: float, batch_size: int
    ) -> list[dict]:
        import base64

        import pandas as pd

        frame = pd.DataFrame({"image": [base64.b64encode(b).decode("ascii") for b in raw]})
        result = self.model.predict(frame, params={"score_threshold": score_threshold})
        rows = result.to_dict(orient="records") if isinstance(result, pd.DataFrame) else list(result)
        return [{k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in r.items()} for r in rows]


class _CheckpointBackend:
    def __init__(self, checkpoint: Path, device: str, overrides: list[str]) -> None:
        from pix2seq.checkpoint import CheckpointError
        from pix2seq.config import ConfigError
        from pix2seq.inference import Predictor

        try:
            self.predictor = Predictor(checkpoint, device=device, overrides=overrides)
        except FileNotFoundError:
            raise CliError(f"model {checkpoint}: no such file") from None
        except CheckpointError as e:
            raise CliError(first_line(e)) from None
        except ConfigError as e:
            raise CliError(f"model {checkpoint}: its config does not load here: {first_line(e)}") from None
        except KeyError as e:
            raise CliError(f"model {checkpoint}: not a pix2seq checkpoint (no {e} entry)") from None
        except RuntimeError as e:  # load_state_dict: an override changed the architecture
            raise CliError(f"model {checkpoint}: cannot build the network: {first_line(e)}") from None
        self.names = [str(c["name"]) for c in self.predictor.categories]
        self.batch_size = self.predictor.batch_size  # eval.batch_size, or chosen for the device

    def predict(
        self, images: list[Any], raw: list[bytes], score_threshold: float, batch_size: int
    ) -> list[dict]:
        return self.predictor.predict(images, score_threshold=score_threshold, batch_size=batch_size)


def _chunks(items: list[ImageJob], n: int) -> Iterator[list[ImageJob]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _validate_device(device: str) -> str:
    """Fail on an unavailable device before any model is fetched or loaded."""
    from pix2seq.inference import resolve_device

    try:
        return str(resolve_device(device))
    except RuntimeError as e:
        raise CliError(f"--device {device}: {first_line(e)}") from None


def _device_arg(value: str) -> str:
    v = value.strip().lower()
    if v in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", v):
        return v
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {value!r}")


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def _threshold(value: str) -> float:
    try:
        t = float(value)
    except ValueError:
        t = -1.0
    if not 0.0 <= t <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value!r}")
    return t


def cmd_predict(args: argparse.Namespace) -> int:
    inputs, overrides = split_overrides(args.inputs)
    if not inputs:
        raise CliError("no input images or folders given")
    from pix2seq.config import ConfigError, config_from_dict

    try:  # unknown keys and bad values fail before the model is fetched
        config_from_dict({}, overrides)
    except ConfigError as e:
        raise CliError(f"override {first_line(e)}") from None

    collected = collect_images(inputs)
    errors = [{"file": name, "error": why} for name, why in collected.missing]
    for name, why in collected.missing:
        print(f"pix2seq predict: error: {name}: {why}", file=sys.stderr)
    if not collected.jobs:
        raise CliError(
            "no images to process" + (f" ({len(errors)} input(s) missing or empty)" if errors else "")
        )

    device = _validate_device(args.device)
    out = Path(args.out)
    from pix2seq.tracking.registry import resolve_model

    with tempfile.TemporaryDirectory(prefix="pix2seq-model-") as tmp:
        resolved = resolve_model(args.model, Path(tmp), args.tracking_uri)
        print(f"pix2seq predict: model {resolved.source}")
        if resolved.checkpoint is not None:
            backend: Any = _CheckpointBackend(resolved.checkpoint, device, overrides)
        else:
            if overrides:
                raise CliError(
                    f"model {args.model}: config overrides need a pix2seq checkpoint, not a plain pyfunc model"
                )
            backend = _PyfuncBackend(resolved.pyfunc_dir)
        entries = _run_predictions(backend, collected.jobs, args, out, errors)

    from pix2seq.atomic import atomic_write_text

    if args.format == "coco":
        text = json.dumps(coco_results(entries)) + "\n"
    else:
        report = {
            "model": args.model,
            "model_source": resolved.source,
            "score_threshold": args.score_threshold,
            "overrides": overrides,
            "images": entries,
            "errors": errors,
        }
        text = _report_json(report)
    atomic_write_text(out / "detections.json", text)
    n_det = sum(len(e["boxes"]) for e in entries)
    print(f"pix2seq predict: {len(entries)} image(s), {n_det} detection(s) -> {out / 'detections.json'}")
    if errors:
        raise CliError(
            f"{len(errors)} input(s) could not be read: "
            + ", ".join(e["file"] for e in errors[:5])
            + (", ..." if len(errors) > 5 else "")
        )
    return 0


def _report_json(report: dict[str, Any]) -> str:
    """Valid JSON, one line per image and per error (boxes one number per line would be unreadable)."""

    def block(items: list[Any]) -> str:
        return "[\n" + ",\n".join("  " + json.dumps(x) for x in items) + "\n ]" if items else "[]"

    fields = [
        f" {json.dumps(k)}: {block(v) if k in ('images', 'errors') else json.dumps(v)}"
        for k, v in report.items()
    ]
    return "{\n" + ",\n".join(fields) + "\n}\n"


def coco_results(entries: list[dict]) -> list[dict]:
    """Entries of :func:`_run_predictions` -> COCO results (``image_id``, ``category_id``, ``bbox``
    xywh, ``score``); an image's id is its file name's number, else its position (1, 2, ...)."""
    out = []
    for position, e in enumerate(entries, start=1):
        stem = Path(e["file"]).stem
        image_id = int(stem) if stem.isdigit() else position
        for (x0, y0, x1, y1), cid, score in zip(e["boxes"], e["category_ids"], e["scores"], strict=True):
            bbox = [round(x0, 3), round(y0, 3), round(x1 - x0, 3), round(y1 - y0, 3)]
            out.append({"image_id": image_id, "category_id": int(cid), "bbox": bbox, "score": score})
    return out


def _read_chunk(
    chunk: list[ImageJob], errors: list[dict[str, str]]
) -> tuple[list[ImageJob], list[Any], list[bytes]]:
    """The chunk's readable images (jobs, uint8 tensors, encoded bytes); the others go to ``errors``."""
    from pix2seq.files import FileReadError, read_regular
    from pix2seq.inference import ImageReadError, read_image

    ok, images, raw = [], [], []
    for job in chunk:
        try:
            data = read_regular(job.path)  # regular files only: a FIFO swapped in is not read
            images.append(read_image(data))
        except (ImageReadError, FileReadError) as e:
            msg = first_line(e).removeprefix("<bytes>: ").removeprefix(f"{job.path}: ")
            errors.append({"file": str(job.path), "error": msg})
            print(f"pix2seq predict: error: {job.path}: {msg}", file=sys.stderr)
            continue
        ok.append(job)
        raw.append(data)
    return ok, images, raw


def _run_predictions(
    backend: Any, jobs: list[ImageJob], args: argparse.Namespace, out: Path, errors: list[dict[str, str]]
) -> list[dict]:
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from pix2seq.evaluation.plots import draw_detections, save_image

    out.mkdir(parents=True, exist_ok=True)
    entries: list[dict] = []
    chunks = list(_chunks(jobs, args.batch_size or backend.batch_size))
    # on a terminal only (disable=None): images/s as it goes
    bar = tqdm(total=len(jobs), desc="predict", unit="img", disable=None, file=sys.stderr)
    # the next chunk's images are read and decoded on a second thread while the model runs
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pix2seq-read") as reader:
        ahead = reader.submit(_read_chunk, chunks[0], errors) if chunks else None
        for i, chunk in enumerate(chunks):
            ok, images, raw = ahead.result()
            if i + 1 < len(chunks):
                ahead = reader.submit(_read_chunk, chunks[i + 1], errors)
            bar.update(len(chunk))
            if not ok:
                continue
            dets = backend.predict(images, raw, args.score_threshold, len(images))
            for job, img, d in zip(ok, images, dets, strict=True):
                names = backend.names
                if names is None:  # a foreign pyfunc model: the names it returned, by label
                    names = {
                        int(lab): str(n) for lab, n in zip(d["labels"], d.get("names", []), strict=False)
                    }
                vis = draw_detections(
                    img, d["boxes"], d["labels"], d["scores"], names=names, score_thresh=args.score_threshold
                )
                save_image(vis, out / job.out_name)
                entries.append({
                    "file": str(job.path),
                    "width": int(img.shape[2]),
                    "height": int(img.shape[1]),
                    "boxes": [[round(float(c), 3) for c in b] for b in d["boxes"]],
                    "scores": [round(float(s), 6) for s in d["scores"]],
                    "labels": [int(v) for v in d["labels"]],
                    "category_ids": [int(v) for v in d.get("category_ids", [])],
                    "names": [str(v) for v in d.get("names", [])],
                    "visualization": job.out_name,
                })  # fmt: skip
    bar.close()
    return entries


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "predict",
        help="detect objects in images with a checkpoint or a registered MLflow model",
        description="Detect objects in image files or folders (recursively *.jpg, *.jpeg, *.png); "
        "write DIR/detections.json and one PNG per image with the boxes drawn.",
        epilog="examples:\n"
        "  pix2seq predict photos/ --out reports/predict        # the champion (of the one task)\n"
        "  pix2seq predict a.jpg b.png --model runs/train/model.pt --device cpu eval.decoding=beam\n"
        "  pix2seq predict val2017/ --format coco --model models:/pix2seq@champion-coco-1a2b3c4d\n"
        "exit status: 0 ok; 2 error (missing model, unknown URI, unavailable device, unreadable images)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="IMAGE|FOLDER|key.sub=value",
        help="image files, folders, and config overrides such as eval.decoding=beam",
    )
    p.add_argument(
        "--model",
        "-m",
        default=DEFAULT_MODEL,
        help=f"checkpoint / model.pt / MLflow model dir or URI (default {DEFAULT_MODEL})",
    )
    p.add_argument("--out", "-o", default="reports/predict", help="output folder (default reports/predict)")
    p.add_argument(
        "--format",
        choices=("json", "coco"),
        default="json",
        help="detections.json: one entry per image (json, default) or a COCO results list (coco)",
    )
    p.add_argument(
        "--score-threshold",
        type=_threshold,
        default=0.3,
        help="keep detections with at least this score (default 0.3)",
    )
    p.add_argument("--device", type=_device_arg, default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help="images per forward pass (default: eval.batch_size, or chosen for the device)",
    )
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI for models:/ and runs:/ (default $MLFLOW_TRACKING_URI, else the repository's mlflow.db)",
    )
    p.set_defaults(func=cmd_predict, positional="inputs")

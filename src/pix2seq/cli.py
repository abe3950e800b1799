"""The ``pix2seq`` command line (console script ``pix2seq = pix2seq.cli:main``).

    pix2seq predict IMAGE_OR_FOLDER... [--model PATH_OR_URI] [--out DIR] [--score-threshold 0.3]
                    [--device auto|cpu|cuda|cuda:N] [--batch-size 8] [--tracking-uri URI] [key.sub=value ...]
    pix2seq weights convert CKPT_PREFIX --arch resnet|resnet-c --image-size N --out model.pt

``--model`` is a checkpoint (``best.pt``, the slim ``model.pt``), an MLflow model directory, or an
MLflow URI: ``models:/pix2seq@champion`` (the default), ``models:/pix2seq/3``, ``runs:/<run id>/model``,
``runs:/<run id>/checkpoints/best.pt``, ``models:/m-<logged model id>``. URIs are resolved against
``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else the repository's ``mlflow.db``.

Folders are searched recursively for ``*.jpg``, ``*.jpeg`` and ``*.png``; files named explicitly are
read whatever their extension. ``DIR/detections.json`` gets one entry per image (file, width, height,
boxes xyxy in pixels, scores, labels, category_ids, names, and the overlay's file name) and
``DIR/<image>.png`` the image with the detections drawn. Detections below ``--score-threshold`` are
left out of both. ``key.sub=value`` arguments override the model's stored config (decoding only
makes sense: ``eval.decoding=beam``, ``eval.beam_size=8``, ``tokenizer.max_instances=...``).

Exit status: 0 on success; 2 on an error, with a one-line message naming what failed: a missing
model or unknown model URI, an unavailable device, a bad override, no images, or unreadable
images (those are listed one per line and in ``detections.json``'s ``errors``; the readable images
are still processed and written).

Subcommands are registered in :data:`COMMANDS`; add one with a ``register(subparsers)`` function
that sets ``func`` (``args -> exit status``) on its parser.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pix2seq.errors import Pix2SeqError, run_entry_point
from pix2seq.files import regular_file_problem
from pix2seq.weights.commands import register as register_weights

EXIT_OK = 0
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
DEFAULT_MODEL = "models:/pix2seq@champion"
CHECKPOINT_ARTIFACT = "checkpoint"  # pix2seq.serving.ARTIFACT (not imported: that pulls in mlflow.pyfunc)
_OVERRIDE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)+=")
_URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")


class CliError(Pix2SeqError):
    """A user-facing error: printed as one line, exit status 2."""


# ------------------------------------------------------------------------------------ model lookup


@dataclass
class ResolvedModel:
    """Where a ``--model`` spec led: a checkpoint file, or (a foreign pyfunc model) a pyfunc directory."""

    spec: str
    checkpoint: Path | None = None
    pyfunc_dir: Path | None = None
    source: str = ""  # human-readable: what the spec resolved to


def is_model_uri(spec: str) -> bool:
    """``models:/...``, ``runs:/...``, ``s3://...``, ``file:///...``; not an existing local path."""
    return bool(_URI_RE.match(spec)) and not Path(spec).exists()


def _first_line(e: BaseException) -> str:
    msg = getattr(e, "message", None) or str(e) or type(e).__name__
    lines = [ln.strip() for ln in str(msg).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _checkpoint_in_model_dir(model_dir: Path) -> Path | None:
    """The ``checkpoint`` artifact of a pix2seq pyfunc model directory (from its MLmodel file)."""
    import yaml

    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        return None
    try:
        meta = yaml.safe_load(mlmodel.read_text()) or {}
    except yaml.YAMLError as e:
        raise CliError(f"{mlmodel}: not a valid MLmodel file ({_first_line(e)})") from None
    artifacts = ((meta.get("flavors") or {}).get("python_function") or {}).get("artifacts") or {}
    entry = artifacts.get(CHECKPOINT_ARTIFACT)
    rel = entry.get("path") if isinstance(entry, dict) else None
    if rel and (model_dir / rel).is_file():
        return model_dir / rel
    return None


def _local_model(path: Path, spec: str) -> ResolvedModel:
    if path.is_file():
        return ResolvedModel(spec, checkpoint=path, source=str(path))
    if path.is_dir():
        ckpt = _checkpoint_in_model_dir(path)
        if ckpt is not None:
            return ResolvedModel(spec, checkpoint=ckpt, source=f"{spec} -> {ckpt}")
        if (path / "MLmodel").is_file():
            return ResolvedModel(spec, pyfunc_dir=path, source=f"{spec} (pyfunc)")
        for name in ("model.pt", "checkpoints/best.pt", "best.pt"):
            if (path / name).is_file():
                return ResolvedModel(spec, checkpoint=path / name, source=str(path / name))
        raise CliError(f"model {spec}: a directory without an MLmodel file, model.pt or checkpoints/best.pt")
    raise CliError(f"model {spec}: no such file or directory")


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///rel.db`` / ``sqlite:////abs.db`` URI (None otherwise)."""
    from urllib.parse import unquote

    if not uri.startswith("sqlite:///"):
        return None
    raw = unquote(uri[len("sqlite:///") :].split("?", 1)[0])
    return None if not raw or raw == ":memory:" else Path(raw)


@contextlib.contextmanager
def use_mlflow_uris(tracking_uri: str, registry_uri: str) -> Iterator[None]:
    """Make ``tracking_uri``/``registry_uri`` MLflow's global URIs for a while, then restore them
    (and the environment variables MLflow sets). MLflow 3 resolves ``models:/name@alias`` and
    ``runs:/<id>/<logged model>`` against the *global* URIs whatever URI it is passed."""
    import mlflow

    env = {
        k: os.environ.get(k)
        for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    }
    # a server that is down: fail in seconds, not after MLflow's default minutes of retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    try:
        from mlflow.tracking._model_registry import utils as _registry
        from mlflow.tracking._tracking_service import utils as _tracking

        saved = (getattr(_tracking, "_tracking_uri", None), getattr(_registry, "_registry_uri", None))
    except ImportError:
        saved = (None, None)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(registry_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        mlflow.set_registry_uri(saved[1])
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def resolve_model(spec: str, download_dir: Path, tracking_uri: str | None = None) -> ResolvedModel:
    """A ``--model`` value -> a local checkpoint (or pyfunc directory); MLflow URIs are downloaded
    into ``download_dir``. Raises :class:`CliError` naming the spec when it leads nowhere."""
    spec = spec.strip()
    if not spec:
        raise CliError("--model: empty")
    if not is_model_uri(spec):
        return _local_model(Path(spec).expanduser(), spec)
    if spec.startswith("file:"):
        from urllib.parse import unquote, urlparse

        return _local_model(Path(unquote(urlparse(spec).path)), spec)

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow
    from mlflow.exceptions import MlflowException

    from pix2seq.tracking import default_tracking_uri

    uri = tracking_uri or default_tracking_uri()
    db = _sqlite_path(uri)
    if db is not None and not db.is_file():  # do not create an empty store just to look a model up
        raise CliError(f"model {spec}: no MLflow store at {db} (set MLFLOW_TRACKING_URI or --tracking-uri)")
    registry = os.environ.get("MLFLOW_REGISTRY_URI", "").strip() or uri
    try:
        with use_mlflow_uris(uri, registry):
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=spec, dst_path=str(download_dir), tracking_uri=uri, registry_uri=registry
            )
    except MlflowException as e:
        raise CliError(f"model {spec}: {_first_line(e)} (tracking URI {uri})") from None
    except OSError as e:
        raise CliError(f"model {spec}: cannot download ({_first_line(e)}; tracking URI {uri})") from None
    except Exception as e:  # noqa: BLE001 - connection errors, bad URIs: report, don't trace back
        raise CliError(f"model {spec}: {type(e).__name__}: {_first_line(e)} (tracking URI {uri})") from None
    resolved = _local_model(Path(local), spec)
    resolved.source = f"{spec} ({uri})"
    return resolved


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
            raise CliError(_first_line(e)) from None
        except ConfigError as e:
            raise CliError(f"model {checkpoint}: its config does not load here: {_first_line(e)}") from None
        except KeyError as e:
            raise CliError(f"model {checkpoint}: not a pix2seq checkpoint (no {e} entry)") from None
        except RuntimeError as e:  # load_state_dict: an override changed the architecture
            raise CliError(f"model {checkpoint}: cannot build the network: {_first_line(e)}") from None
        self.names = [str(c["name"]) for c in self.predictor.categories]

    def predict(
        self, images: list[Any], raw: list[bytes], score_threshold: float, batch_size: int
    ) -> list[dict]:
        return self.predictor.predict(images, score_threshold=score_threshold, batch_size=batch_size)


def _chunks(items: list[ImageJob], n: int) -> Iterator[list[ImageJob]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _save_png(image: Any, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _validate_device(device: str) -> str:
    """Fail on an unavailable device before any model is fetched or loaded."""
    from pix2seq.inference import resolve_device

    try:
        return str(resolve_device(device))
    except RuntimeError as e:
        raise CliError(f"--device {device}: {_first_line(e)}") from None


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
        raise CliError(f"override {_first_line(e)}") from None

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
    with tempfile.TemporaryDirectory(prefix="pix2seq-model-") as tmp:
        resolved = resolve_model(args.model, Path(tmp), args.tracking_uri)
        if resolved.checkpoint is not None:
            backend: Any = _CheckpointBackend(resolved.checkpoint, device, overrides)
        else:
            if overrides:
                raise CliError(
                    f"model {args.model}: config overrides need a pix2seq checkpoint, not a plain pyfunc model"
                )
            backend = _PyfuncBackend(resolved.pyfunc_dir)
        entries = _run_predictions(backend, collected.jobs, args, out, errors)

    from pix2seq.config import atomic_write_text

    report = {
        "model": args.model,
        "model_source": resolved.source,
        "score_threshold": args.score_threshold,
        "overrides": overrides,
        "images": entries,
        "errors": errors,
    }
    atomic_write_text(out / "detections.json", _report_json(report))
    n_det = sum(len(e["boxes"]) for e in entries)
    print(f"pix2seq predict: {len(entries)} image(s), {n_det} detection(s) -> {out / 'detections.json'}")
    if errors:
        raise CliError(
            f"{len(errors)} input(s) could not be read: "
            + ", ".join(e["file"] for e in errors[:5])
            + (", ..." if len(errors) > 5 else "")
        )
    return EXIT_OK


def _report_json(report: dict[str, Any]) -> str:
    """Valid JSON, one line per image and per error (boxes one number per line would be unreadable)."""

    def block(items: list[Any]) -> str:
        return "[\n" + ",\n".join("  " + json.dumps(x) for x in items) + "\n ]" if items else "[]"

    fields = [
        f" {json.dumps(k)}: {block(v) if k in ('images', 'errors') else json.dumps(v)}"
        for k, v in report.items()
    ]
    return "{\n" + ",\n".join(fields) + "\n}\n"


def _run_predictions(
    backend: Any, jobs: list[ImageJob], args: argparse.Namespace, out: Path, errors: list[dict[str, str]]
) -> list[dict]:
    from pix2seq.evaluation.plots import draw_detections
    from pix2seq.files import FileReadError, read_regular
    from pix2seq.inference import ImageReadError, read_image

    out.mkdir(parents=True, exist_ok=True)
    entries: list[dict] = []
    for chunk in _chunks(jobs, args.batch_size):
        ok, images, raw = [], [], []
        for job in chunk:
            try:
                data = read_regular(job.path)  # regular files only: a FIFO swapped in is not read
                images.append(read_image(data))
            except (ImageReadError, FileReadError) as e:
                msg = _first_line(e).removeprefix("<bytes>: ").removeprefix(f"{job.path}: ")
                errors.append({"file": str(job.path), "error": msg})
                print(f"pix2seq predict: error: {job.path}: {msg}", file=sys.stderr)
                continue
            ok.append(job)
            raw.append(data)
        if not ok:
            continue
        dets = backend.predict(images, raw, args.score_threshold, len(images))
        for job, img, d in zip(ok, images, dets, strict=True):
            names = backend.names
            if names is None:  # a foreign pyfunc model: the names it returned, by label
                names = {int(lab): str(n) for lab, n in zip(d["labels"], d.get("names", []), strict=False)}
            vis = draw_detections(
                img, d["boxes"], d["labels"], d["scores"], names=names, score_thresh=args.score_threshold
            )
            _save_png(vis, out / job.out_name)
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
    return entries


def register_predict(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "predict",
        help="detect objects in images with a checkpoint or a registered MLflow model",
        description="Detect objects in image files or folders (recursively *.jpg, *.jpeg, *.png); "
        "write DIR/detections.json and one PNG per image with the boxes drawn.",
        epilog="examples:\n"
        "  pix2seq predict photos/ --model models:/pix2seq@champion --out reports/predict\n"
        "  pix2seq predict a.jpg b.png --model runs/train/model.pt --device cpu eval.decoding=beam\n"
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
        "--score-threshold",
        type=_threshold,
        default=0.3,
        help="keep detections with at least this score (default 0.3)",
    )
    p.add_argument("--device", type=_device_arg, default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="images per forward pass (default 8)")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI for models:/ and runs:/ (default $MLFLOW_TRACKING_URI, else the repository's mlflow.db)",
    )
    p.set_defaults(func=cmd_predict)


COMMANDS: list[Callable[[Any], None]] = [register_predict, register_weights]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pix2seq", description="Stable-Pix2Seq command line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in COMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    parser = build_parser()
    # positionals after options (`predict imgs/ --out x eval.decoding=beam`) come back as extras
    args, extra = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    unknown = [e for e in extra if e.startswith("-") and e != "-"]
    if unknown or (extra and not hasattr(args, "inputs")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.inputs = [*args.inputs, *extra]
    # config, checkpoint and file errors (e.g. --out not writable): one line naming what, status 2
    return run_entry_point(f"pix2seq {args.command}", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())

"""The model registry: one champion per task, and where a model spec (path or URI) leads.

A *task* is a validation set: ``<dataset>-<first 8 hex of the validation manifest's MD5>``
(:func:`task_name`, e.g. ``generated-3f2a9c1b``). Every registered version is tagged with its task,
validation digest and AP; the alias ``champion-<task>`` moves to a new version only when its AP beats
the current holder's on the *same* validation set (:func:`promote_champion`), so a shapes model can
never displace a COCO model.

:func:`resolve_model` turns what a user types after ``--model`` into a local file::

    runs/train/model.pt, best.pt, an MLflow model directory     local paths
    models:/pix2seq@champion                                    the champion, when one task has one
    models:/pix2seq@champion-<task>, models:/pix2seq/3          a registered version
    runs:/<run id>/model, runs:/<run id>/checkpoints/best.pt    a run's model or file
    models:/m-<logged model id>, file:///..., s3://...          other MLflow URIs
    official:NAME                                               pix2seq.weights.official.resolve

MLflow URIs are resolved against explicit tracking and registry URIs (no global state is set).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pix2seq.errors import Pix2SeqError, first_line
from pix2seq.tracking.store import default_tracking_uri, mlflow_client, sqlite_path

log = logging.getLogger(__name__)

CHAMPION = "champion"
MODEL_ARTIFACT = "checkpoint"  # the pix2seq model file inside a logged pyfunc model
_URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")


class ModelNotFound(Pix2SeqError):
    """A model spec that leads nowhere; the message names the spec and the store."""


# ------------------------------------------------------------------------------------ champions


def task_name(dataset: str, val_digest: str) -> str:
    """``<dataset>-<digest[:8]>``: a readable name that changes with the validation set."""
    slug = re.sub(r"[^A-Za-z0-9_]+", "-", dataset).strip("-").lower() or "data"
    return f"{slug}-{val_digest[:8]}"


def champion_alias(task: str) -> str:
    return f"{CHAMPION}-{task}"


def register_model(
    name: str,
    run_id: str,
    model_id: str,
    ap: float,
    *,
    task: str,
    val_digest: str,
    tags: Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
) -> str:
    """A new version of ``name`` from the run's logged model (``models:/<model_id>``), tagged with its
    ``AP``, ``task``, ``val_digest`` and ``run_id``; returns the version (a string, as MLflow's API)."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client(tracking_uri)
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if "already exists" not in str(e).lower() and "ALREADY_EXISTS" not in str(e.error_code):
            raise
    version_tags = {"AP": repr(float(ap)), "task": task, "val_digest": val_digest, "run_id": run_id}
    version_tags.update({str(k): str(v) for k, v in (tags or {}).items()})
    mv = client.create_model_version(
        name, source=f"models:/{model_id}", run_id=run_id, tags=version_tags, model_id=model_id
    )
    return str(mv.version)


def _version_ap(tags: Mapping[str, str]) -> float | None:
    """The ``AP`` tag of a model version, None when missing or not a number."""
    raw = tags.get("AP")
    try:
        value = float(raw) if raw is not None else None
    except ValueError:
        return None
    return None if value is None or math.isnan(value) else value


def promote_champion(name: str, version: str | int, *, tracking_uri: str | None = None) -> bool:
    """Point ``champion-<task>`` at ``version`` if its AP beats the current holder's (the version's
    ``task`` tag names the alias; only versions of the same validation set are compared). True if the
    alias now points at ``version``. Ties keep the incumbent; a holder without an AP is beaten.
    Not atomic across processes: promotions come from one process at a time (rank 0, the study)."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client(tracking_uri)
    version = str(version)
    mv = client.get_model_version(name, version)
    task, ap = mv.tags.get("task"), _version_ap(mv.tags)
    if not task or ap is None:
        raise ValueError(f"{name} v{version}: no 'task' and 'AP' tags (register it with register_model)")
    alias = champion_alias(task)
    try:
        current = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        current = None
    if current is not None:
        if str(current.version) == version:
            return True
        if current.tags.get("val_digest") != mv.tags.get("val_digest"):
            log.warning(
                "%s@%s v%s was evaluated on another validation set; replacing it",
                name,
                alias,
                current.version,
            )
        else:
            incumbent = _version_ap(current.tags)
            if incumbent is not None and ap <= incumbent:
                log.info(
                    "%s v%s: AP %.2f does not beat %s v%s (%.2f)",
                    name,
                    version,
                    ap,
                    alias,
                    current.version,
                    incumbent,
                )
                return False
    client.set_registered_model_alias(name, alias, version)
    log.info("%s v%s is now %s (AP %.2f)", name, version, alias, ap)
    return True


def champions(name: str, tracking_uri: str | None = None) -> dict[str, str]:
    """``{task: version}`` of every ``champion-<task>`` alias of the registered model ``name``."""
    aliases = mlflow_client(tracking_uri).get_registered_model(name).aliases or {}
    prefix = champion_alias("")
    return {a[len(prefix) :]: str(v) for a, v in aliases.items() if a.startswith(prefix)}


# ------------------------------------------------------------------------------------ model specs


@dataclass
class ResolvedModel:
    """Where a model spec led: a pix2seq model file, or (a foreign pyfunc model) a pyfunc directory."""

    spec: str
    checkpoint: Path | None = None
    pyfunc_dir: Path | None = None
    source: str = ""  # human-readable: what the spec resolved to (and which task's champion)


def is_model_uri(spec: str) -> bool:
    """``models:/...``, ``runs:/...``, ``s3://...``, ``file:///...``; not an existing local path."""
    return bool(_URI_RE.match(spec)) and not Path(spec).exists()


def _checkpoint_in_model_dir(model_dir: Path) -> Path | None:
    """The ``checkpoint`` artifact of a pix2seq pyfunc model directory (from its MLmodel file)."""
    import yaml

    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        return None
    try:
        meta = yaml.safe_load(mlmodel.read_text()) or {}
    except yaml.YAMLError as e:
        raise ModelNotFound(f"{mlmodel}: not a valid MLmodel file ({first_line(e)})") from None
    artifacts = ((meta.get("flavors") or {}).get("python_function") or {}).get("artifacts") or {}
    entry = artifacts.get(MODEL_ARTIFACT)
    rel = entry.get("path") if isinstance(entry, dict) else None
    if rel and (model_dir / rel).is_file():
        return model_dir / rel
    return None


def local_model(path: Path, spec: str) -> ResolvedModel:
    """A model file, a pix2seq MLflow model directory, a foreign pyfunc directory or a training
    folder (``model.pt``, ``checkpoints/best.pt``)."""
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
        raise ModelNotFound(
            f"model {spec}: a directory without an MLmodel file, model.pt or checkpoints/best.pt"
        )
    raise ModelNotFound(f"model {spec}: no such file or directory")


def _official(spec: str) -> ResolvedModel:
    from pix2seq.weights.official import resolve

    try:
        path = Path(resolve(spec))
    except Pix2SeqError as e:  # an unknown name, a failed download or conversion
        raise ModelNotFound(f"model {spec}: {e}") from None
    return ResolvedModel(spec, checkpoint=path, source=f"{spec} -> {path}")


def _champion_uri(spec: str, client: Any) -> tuple[str, str]:
    """``models:/NAME@champion`` -> the one ``champion-<task>`` alias (and a note naming the task);
    other specs unchanged."""
    m = re.fullmatch(r"models:/([^/@]+)@(champion(?:-[\w-]+)?)(/.*)?", spec)
    if not m:
        return spec, ""
    name, alias, rest = m.group(1), m.group(2), m.group(3) or ""
    if alias != CHAMPION:
        mv = client.get_model_version_by_alias(name, alias)
        return spec, f"champion of task {alias[len(CHAMPION) + 1 :]}, v{mv.version}"
    aliases = client.get_registered_model(name).aliases or {}
    if CHAMPION in aliases:  # a registry that still has a plain champion alias
        return spec, f"v{aliases[CHAMPION]}"
    found = sorted((a, str(v)) for a, v in aliases.items() if a.startswith(CHAMPION + "-"))
    if not found:
        raise ModelNotFound(f"model {spec}: {name} has no champion yet (train with tracking.register: true)")
    if len(found) > 1:
        listed = ", ".join(f"models:/{name}@{a} (v{v})" for a, v in found)
        raise ModelNotFound(
            f"model {spec}: {name} has champions for {len(found)} tasks; choose one: {listed}"
        )
    alias, version = found[0]
    return f"models:/{name}@{alias}{rest}", f"champion of task {alias[len(CHAMPION) + 1 :]}, v{version}"


def _download_logged_model(client: Any, model_id: str, sub: str, dst: Path, uri: str) -> str:
    import mlflow

    location = client.get_logged_model(model_id).artifact_location.rstrip("/")
    return mlflow.artifacts.download_artifacts(
        artifact_uri=f"{location}/{sub}" if sub else location, dst_path=str(dst), tracking_uri=uri
    )


def _download(target: str, client: Any, dst: Path, uri: str) -> str:
    """Download ``models:/...``, ``runs:/...`` or any artifact URI through ``client``'s stores.

    MLflow's own ``download_artifacts`` resolves registry URIs against the *global* registry URI
    whatever it is passed, so registered and logged models are looked up here, with the client."""
    import mlflow

    m = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/([^/]+))?(?:/(.*))?", target)
    if m:
        name, alias, version, sub = m.group(1), m.group(2), m.group(3), m.group(4) or ""
        if alias is None and version is None:  # models:/m-<id>: a logged model
            return _download_logged_model(client, name, sub, dst, uri)
        mv = (
            client.get_model_version_by_alias(name, alias)
            if alias
            else client.get_model_version(name, version)
        )
        model_id = getattr(mv, "model_id", None) or str(mv.source).removeprefix("models:/")
        return _download_logged_model(client, model_id, sub, dst, uri)
    m = re.fullmatch(r"runs:/([^/]+)/(.+)", target)
    if m:
        run_id, path = m.group(1), m.group(2).strip("/")
        head, _, sub = path.partition("/")
        run = client.get_run(run_id)
        for out in getattr(getattr(run, "outputs", None), "model_outputs", None) or []:
            if client.get_logged_model(out.model_id).name == head:  # MLflow 3 keeps models outside the run
                return _download_logged_model(client, out.model_id, sub, dst, uri)
        return client.download_artifacts(run_id, path, str(dst))
    return mlflow.artifacts.download_artifacts(artifact_uri=target, dst_path=str(dst), tracking_uri=uri)


def resolve_model(spec: str, download_dir: Path, tracking_uri: str | None = None) -> ResolvedModel:
    """A model spec (module docstring) -> a local model file or pyfunc directory; MLflow URIs are
    downloaded into ``download_dir``. Raises :class:`ModelNotFound` naming the spec and the store."""
    spec = spec.strip()
    if not spec:
        raise ModelNotFound("--model: empty")
    if spec.startswith("official:"):
        return _official(spec)
    if not is_model_uri(spec):
        return local_model(Path(spec).expanduser(), spec)
    if spec.startswith("file:"):
        from urllib.parse import unquote, urlparse

        return local_model(Path(unquote(urlparse(spec).path)), spec)

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # a server that is down: fail in seconds, not after MLflow's default minutes of retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    from mlflow.exceptions import MlflowException

    uri = tracking_uri or default_tracking_uri()
    db = sqlite_path(uri)
    if db is not None and not db.is_file():  # do not create an empty store just to look a model up
        raise ModelNotFound(
            f"model {spec}: no MLflow store at {db} (set MLFLOW_TRACKING_URI or --tracking-uri)"
        )
    try:
        client = mlflow_client(uri)
        target, note = _champion_uri(spec, client)
        local = _download(target, client, download_dir, uri)
    except Pix2SeqError:
        raise
    except MlflowException as e:
        raise ModelNotFound(f"model {spec}: {first_line(e)} (tracking URI {uri})") from None
    except OSError as e:
        raise ModelNotFound(f"model {spec}: cannot download ({first_line(e)}; tracking URI {uri})") from None
    except Exception as e:  # noqa: BLE001 - connection errors, bad URIs: report, don't trace back
        raise ModelNotFound(
            f"model {spec}: {type(e).__name__}: {first_line(e)} (tracking URI {uri})"
        ) from None
    resolved = local_model(Path(local), spec)
    resolved.source = f"{target}" + (f" ({note})" if note else "") + f" from {uri}"
    return resolved

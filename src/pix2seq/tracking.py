"""MLflow tracking (3.x): one run per training, params/metrics/artifacts/datasets, model registry.

Only rank 0 tracks. Callers pass ``enabled=is_main()`` (or ``cfg``-driven flags) and may then call
every method unconditionally: a disabled :class:`RunTracker` does nothing and imports nothing.

Where runs go: ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<repo root>/mlflow.db``
(:func:`default_tracking_uri`; MLflow 3 no longer accepts a plain ``./mlruns`` file store as its
default). Artifacts of experiments this module creates on a local SQLite store live beside the
database in ``<repo root>/mlruns/`` whatever the working directory is::

    tracker = RunTracker(cfg, enabled=info.is_main, run_id_file=out / "mlflow_run_id",
                         resume=resumed_from_checkpoint)
    with tracker:                                  # FINISHED / FAILED / KILLED on exit
        tracker.log_dataset(manifest, "train", context="training")
        tracker.log_metrics({"train/loss": loss}, step=global_step)
        tracker.log_artifact(out / "best.pt", "checkpoints")

Registry: :func:`register_model` creates a version (its metric stored as a version tag) and
:func:`promote_champion` moves the ``champion`` alias only when the new version's metric beats the
current champion's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlparse

from pix2seq.config import Config, atomic_write_text

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

__all__ = [
    "MAX_PARAM_VALUE_LENGTH",
    "RunTracker",
    "default_tracking_uri",
    "file_digest",
    "find_repo_root",
    "git_commit",
    "promote_champion",
    "register_model",
]

PathLike = str | os.PathLike[str]
RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
MAX_PARAM_VALUE_LENGTH = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
_MAX_TAG_VALUE_LENGTH = 8000


# ------------------------------------------------------------------------------------ locations


def find_repo_root(start: PathLike | None = None) -> Path:
    """Nearest parent of ``start`` (default: cwd) holding ``params.yaml`` or ``.git``; else ``start``.

    Inside a DVC temporary experiment workspace (``<repo>/.dvc/tmp/exps/<tmp>/...``) the answer is
    the outer ``<repo>``, so runs of ``dvc exp run --temp``/queued experiments land in the real
    repository's store instead of a directory DVC deletes afterwards.
    """
    here = Path(start or Path.cwd()).resolve()
    parts = here.parts
    for i in range(len(parts) - 2):
        if parts[i] == ".dvc" and parts[i + 1] == "tmp" and parts[i + 2] == "exps":
            return Path(*parts[:i])
    for d in (here, *here.parents):
        if (d / "params.yaml").is_file() or (d / ".git").exists():
            return d
    return here


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<repo root>/mlflow.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    return f"sqlite:///{find_repo_root() / 'mlflow.db'}"


def _local_sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    raw = unquote(urlparse(uri).path)
    if not raw or raw == "/:memory:":
        return None
    return Path(raw)


def git_commit(cwd: PathLike | None = None) -> tuple[str | None, bool | None]:
    """``(HEAD commit, dirty)`` of the repository at ``cwd``; ``(None, None)`` outside git."""
    cwd = str(cwd or find_repo_root())
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        st = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        return (sha or None), bool(st.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def file_digest(path: PathLike) -> str:
    """MD5 of a file's bytes (32 hex chars: fits MLflow's 36-char digest; equals DVC's file md5)."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _param_str(value: Any) -> str:
    s = (
        value
        if isinstance(value, str)
        else json.dumps(value)
        if isinstance(value, list | dict)
        else str(value)
    )
    if len(s) > MAX_PARAM_VALUE_LENGTH:
        s = s[: MAX_PARAM_VALUE_LENGTH - 3] + "..."
    return s


def _manifest_profile(path: Path) -> dict[str, Any]:
    """Cheap summary of a manifest: size, and for JSON top-level scalars and list lengths."""
    prof: dict[str, Any] = {"num_bytes": path.stat().st_size}
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return prof
        if isinstance(data, dict):
            for k, v in data.items():
                if isinstance(v, list):
                    prof[f"num_{k}"] = len(v)
                elif isinstance(v, bool | int | float) or (isinstance(v, str) and len(v) <= 200):
                    prof[k] = v
        elif isinstance(data, list):
            prof["num_records"] = len(data)
    elif path.suffix.lower() in (".jsonl", ".csv", ".txt", ".tsv"):
        with open(path, "rb") as f:
            prof["num_lines"] = sum(1 for _ in f)
    return prof


# ---------------------------------------------------------------------------------------- runs


@contextlib.contextmanager
def _sqlite_init_lock(uri: str) -> Iterator[None]:
    """Serialise the first contact with a local sqlite store across processes.

    MLflow creates and migrates a new sqlite database on first use; two processes doing it at once
    (tuning workers, torchrun jobs sharing ``mlflow.db``) race and one fails with
    "duplicate column name". An advisory file lock beside the database prevents it.
    """
    db = _local_sqlite_path(uri)
    if db is None:
        yield
        return
    import fcntl

    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".init.lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class RunTracker:
    """One MLflow run: start (new, nested or resumed), log, end. A no-op when ``enabled=False``.

    Args:
        cfg: the resolved config: experiment name and system-metrics flag come from
            ``cfg.tracking``, and ``cfg.flat()`` is logged as params when the run starts.
        enabled: False on non-zero ranks (or to switch tracking off): every method returns at once.
        experiment: overrides ``cfg.tracking.experiment``.
        run_name: the run's display name (new runs only).
        tracking_uri: default :func:`default_tracking_uri`.
        run_id_file: where the run id is kept (e.g. ``<train.output_dir>/mlflow_run_id``); written
            when the run starts.
        resume: continue the run named in ``run_id_file`` (if it exists and is not deleted);
            pass True exactly when training resumes from a checkpoint.
        parent_run_id: nest under this run (e.g. the Optuna study's run), in-process or not.
        nested: start nested under this process's active run.
        tags: extra run tags.
        log_system_metrics: overrides ``cfg.tracking.log_system_metrics`` (needs psutil).
    """

    def __init__(
        self,
        cfg: Config | None = None,
        *,
        enabled: bool = True,
        experiment: str | None = None,
        run_name: str | None = None,
        tracking_uri: str | None = None,
        run_id_file: PathLike | None = None,
        resume: bool = False,
        parent_run_id: str | None = None,
        nested: bool = False,
        tags: Mapping[str, Any] | None = None,
        log_system_metrics: bool | None = None,
    ) -> None:
        self.enabled = bool(enabled)
        self.cfg = cfg
        self.experiment = experiment or (cfg.tracking.experiment if cfg is not None else "pix2seq")
        self.run_name = run_name
        self.tracking_uri = tracking_uri
        self.run_id_file = Path(run_id_file) if run_id_file is not None else None
        self.resume = resume
        self.parent_run_id = parent_run_id
        self.nested = nested
        self.tags = dict(tags or {})
        if log_system_metrics is None:
            log_system_metrics = cfg.tracking.log_system_metrics if cfg is not None else False
        self.log_system_metrics = bool(log_system_metrics)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.resumed = False
        self._client: MlflowClient | None = None
        self._ended = False

    # ----------------------------------------------------------------------------- lifecycle
    @property
    def active(self) -> bool:
        return self.enabled and self.run_id is not None and not self._ended

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        db = _local_sqlite_path(self.tracking_uri or "")
        location = (db.resolve().parent / "mlruns").as_uri() if db is not None else None
        try:
            return self.client.create_experiment(self.experiment, artifact_location=location)
        except MlflowException:  # created concurrently by another process
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    def _system_metrics_ok(self) -> bool:
        if not self.log_system_metrics:
            return False
        try:
            import psutil  # noqa: F401
        except ImportError:
            log.warning("tracking.log_system_metrics: psutil is not installed; system metrics disabled")
            return False
        return True

    def _resumable_run_id(self) -> str | None:
        if not (self.resume and self.run_id_file is not None and self.run_id_file.is_file()):
            return None
        rid = self.run_id_file.read_text().strip()
        if not rid:
            return None
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(rid)
        except MlflowException:
            log.warning(
                "%s names run %s, which is not in %s; starting a new run",
                self.run_id_file,
                rid,
                self.tracking_uri,
            )
            return None
        if run.info.lifecycle_stage == "deleted":
            log.warning("run %s was deleted; starting a new run", rid)
            return None
        return rid

    def start(self) -> str | None:
        """Start (or resume) the run, log tags and the config; returns the run id (None if disabled)."""
        if not self.enabled:
            return None
        if self.run_id is not None:
            return self.run_id
        import mlflow

        self.tracking_uri = self.tracking_uri or default_tracking_uri()
        mlflow.set_tracking_uri(self.tracking_uri)
        self._client = None
        with _sqlite_init_lock(self.tracking_uri):
            self.experiment_id = self._experiment_id()
        system = self._system_metrics_ok()

        rid = self._resumable_run_id()
        active = mlflow.active_run()
        nested = self.nested or active is not None
        if rid is not None:
            run = mlflow.start_run(run_id=rid, nested=nested, log_system_metrics=system)
            self.resumed = True
            self.experiment_id = run.info.experiment_id
        else:
            parent = self.parent_run_id
            if parent is not None and active is not None and active.info.run_id != parent:
                raise RuntimeError(
                    f"parent_run_id {parent} is not this process's active run {active.info.run_id}; "
                    "end that run first or nest under it"
                )
            run = mlflow.start_run(
                experiment_id=self.experiment_id,
                run_name=self.run_name,
                nested=nested,
                parent_run_id=parent,
                log_system_metrics=system,
            )
        self.run_id = run.info.run_id
        self._ended = False
        if self.run_id_file is not None:
            atomic_write_text(self.run_id_file, self.run_id + "\n")

        tags = dict(self._default_tags())
        tags.update(self.tags)
        if self.resumed:
            tags["resumed"] = "true"
        self.set_tags(tags)
        if self.cfg is not None:
            self.log_config(self.cfg)
        log.info(
            "MLflow run %s (%s) in %s", self.run_id, "resumed" if self.resumed else "new", self.tracking_uri
        )
        return self.run_id

    def _default_tags(self) -> dict[str, str]:
        tags: dict[str, str] = {}
        sha, dirty = git_commit()
        if sha:
            tags["git.commit"] = sha
            tags["mlflow.source.git.commit"] = sha
            tags["git.dirty"] = str(bool(dirty)).lower()
        for env, tag in (
            ("DVC_EXP_NAME", "dvc.exp_name"),
            ("DVC_EXP_BASELINE_REV", "dvc.exp_baseline_rev"),
            ("DVC_STAGE", "dvc.stage"),
        ):
            if os.environ.get(env):
                tags[tag] = os.environ[env]
        return tags

    def end(self, status: RunStatus = "FINISHED") -> None:
        """End the run with ``FINISHED``, ``FAILED`` or ``KILLED`` (idempotent)."""
        if not self.active:
            return
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status must be FINISHED, FAILED or KILLED, got {status!r}")
        import mlflow

        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            mlflow.end_run(status=status)  # also stops the system-metrics thread
        else:
            self.client.set_terminated(self.run_id, status=status)
        self._ended = True

    def __enter__(self) -> RunTracker:
        self.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None or (exc_type is SystemExit and exc is not None and exc.code in (0, None)):
            status: RunStatus = "FINISHED"
        elif issubclass(exc_type, KeyboardInterrupt | SystemExit):
            status = "KILLED"
        else:
            status = "FAILED"
        self.end(status)

    # ---------------------------------------------------------------------------------- logging
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (values stringified, lists as JSON, truncated to 6000 chars).

        A param that already holds a *different* value (MLflow params are immutable; this happens
        when a resumed training runs with an edited config) is not re-logged: the change is
        recorded as tag ``param_changed.<key>`` and warned about.
        """
        if not self.active or not params:
            return
        from mlflow.entities import Param

        new = {str(k): _param_str(v) for k, v in params.items()}
        existing = self.client.get_run(self.run_id).data.params
        to_log, changed = [], {}
        for k, v in new.items():
            if k in existing:
                if existing[k] != v:
                    changed[f"param_changed.{k}"] = f"{existing[k]} -> {v}"[:_MAX_TAG_VALUE_LENGTH]
                continue
            to_log.append(Param(k, v))
        for i in range(0, len(to_log), 100):
            self.client.log_batch(self.run_id, params=to_log[i : i + 100])
        if changed:
            log.warning(
                "resumed run %s: %d param(s) changed since it started: %s",
                self.run_id,
                len(changed),
                sorted(changed),
            )
            self.set_tags(changed)

    def log_config(self, cfg: Config) -> None:
        """The whole resolved config as params (``train.lr``, ``model.backbone``, ...)."""
        self.log_params(cfg.flat())

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.active or not tags:
            return
        from mlflow.entities import RunTag

        items = [RunTag(str(k), str(v)[:_MAX_TAG_VALUE_LENGTH]) for k, v in tags.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, tags=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numeric metrics (tensors/NumPy scalars accepted; None and non-numbers skipped)."""
        if not self.active or not metrics:
            return
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = []
        for k, v in metrics.items():
            if v is None:
                continue
            try:
                value = float(v.item() if hasattr(v, "item") else v)
            except (TypeError, ValueError):
                log.debug("log_metrics: skipping non-numeric %s=%r", k, v)
                continue
            if math.isinf(value):
                value = math.copysign(1.7976931348623157e308, value)
            items.append(Metric(str(k), value, ts, int(step or 0)))
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_artifact(self, path: PathLike, artifact_path: str | None = None) -> None:
        """Upload a file (or a directory's contents) under ``artifact_path``."""
        if not self.active:
            return
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), artifact_path)
        elif p.is_file():
            self.client.log_artifact(self.run_id, str(p), artifact_path)
        else:
            raise FileNotFoundError(f"{p}: artifact not found")

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        """A dict as a JSON/YAML artifact (format from the extension)."""
        if self.active:
            self.client.log_dict(self.run_id, dict(data), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.active:
            self.client.log_text(self.run_id, text, artifact_file)

    def log_dataset(
        self,
        manifest_path: PathLike,
        name: str,
        context: str = "training",
        profile: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> str | None:
        """Record a dataset input: name, ``file_digest(manifest)``, local source URI and a profile.

        The digest is the manifest's MD5 (what ``dvc.lock`` records for it), so the MLflow UI's
        dataset column tells at a glance whether two runs trained on the same data. Returns it.
        """
        if not self.active:
            return None
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        p = Path(manifest_path).resolve()
        if not p.is_file():
            raise FileNotFoundError(f"{p}: dataset manifest not found")
        digest = file_digest(p)
        prof = _manifest_profile(p)
        prof.update(profile or {})
        entity = Dataset(
            name=name,
            digest=digest,
            source_type="local",
            source=json.dumps({"uri": str(p)}),
            schema=None,
            profile=json.dumps(prof, default=str),
        )
        input_tags = [InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)]
        input_tags += [InputTag(key=str(k), value=str(v)) for k, v in (tags or {}).items()]
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset=entity, tags=input_tags)])
        return digest


# ------------------------------------------------------------------------------------ registry


def _client(tracking_uri: str | None) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri or default_tracking_uri())


def register_model(
    run_id: str,
    artifact_path: str,
    name: str,
    metric_value: float,
    metric_name: str = "AP",
    *,
    model_uri: str | None = None,
    tags: Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
) -> str:
    """Register the model logged by ``run_id`` under ``artifact_path`` as a new version of ``name``.

    MLflow 3 stores ``log_model(name=artifact_path)`` as a LoggedModel (``models:/<model_id>``),
    not under the run's artifacts; it is looked up through the run's outputs, falling back to
    ``runs:/<run_id>/<artifact_path>`` (MLflow 2 style artifacts). ``model_uri`` (e.g.
    ``ModelInfo.model_uri``) skips the lookup. The version is tagged
    ``{metric_name: metric_value, "run_id": run_id}`` so :func:`promote_champion` can compare.
    Returns the version (a string, as MLflow's API uses).
    """
    import mlflow

    uri = tracking_uri or default_tracking_uri()
    version_tags = {metric_name: repr(float(metric_value)), "run_id": run_id}
    version_tags.update({str(k): str(v) for k, v in (tags or {}).items()})
    if model_uri is None:
        model_uri = (
            _logged_model_uri(_client(uri), run_id, artifact_path) or f"runs:/{run_id}/{artifact_path}"
        )
    previous = mlflow.get_tracking_uri()
    if previous != uri:  # mlflow.register_model has no client argument: it uses the global URI
        mlflow.set_tracking_uri(uri)
    try:
        mv = mlflow.register_model(model_uri, name, tags=version_tags)
    finally:
        if previous != uri:
            mlflow.set_tracking_uri(previous)
    return str(mv.version)


def _logged_model_uri(client: MlflowClient, run_id: str, name: str) -> str | None:
    """``models:/<model_id>`` of the newest MLflow 3 LoggedModel named ``name`` output by the run."""
    run = client.get_run(run_id)
    outputs = getattr(run, "outputs", None)
    best: tuple[int, str] | None = None
    for out in getattr(outputs, "model_outputs", None) or []:
        try:
            model = client.get_logged_model(out.model_id)
        except Exception:  # noqa: BLE001 - a dangling output must not block registration
            continue
        if model.name == name and (best is None or out.step >= best[0]):
            best = (out.step, out.model_id)
    return f"models:/{best[1]}" if best else None


def _version_metric(client: MlflowClient, name: str, version: str, metric_name: str) -> float | None:
    raw = client.get_model_version(name, version).tags.get(metric_name)
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


def promote_champion(
    name: str,
    version: str | int,
    metric: float | None = None,
    metric_name: str = "AP",
    *,
    alias: str = "champion",
    higher_is_better: bool = True,
    tracking_uri: str | None = None,
) -> bool:
    """Point ``alias`` at ``version`` if its metric beats the current holder's; True if it moved.

    ``metric`` defaults to the version's ``metric_name`` tag (set by :func:`register_model`) and is
    (re)written as that tag. A champion without the tag is always beaten; ties keep the incumbent.
    Not atomic across processes: serialise promotions (e.g. only the study's parent process).
    """
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    version = str(version)
    if metric is None:
        metric = _version_metric(client, name, version, metric_name)
        if metric is None:
            raise ValueError(f"{name} v{version}: no '{metric_name}' tag and no metric given")
    else:
        client.set_model_version_tag(name, version, metric_name, repr(float(metric)))
    metric = float(metric)
    if math.isnan(metric):
        return False

    try:
        current = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        current = None
    if current is not None:
        if str(current.version) == version:
            return True
        incumbent = _version_metric(client, name, str(current.version), metric_name)
        if incumbent is not None and not math.isnan(incumbent):
            better = metric > incumbent if higher_is_better else metric < incumbent
            if not better:
                log.info(
                    "%s v%s: %s %.4f does not beat %s v%s (%.4f); alias unchanged",
                    name, version, metric_name, metric, alias, current.version, incumbent,
                )  # fmt: skip
                return False
    client.set_registered_model_alias(name, alias, version)
    log.info("%s v%s is now '%s' (%s %.4f)", name, version, alias, metric_name, metric)
    return True

"""One MLflow run per training: params, metrics, artifacts, datasets, images (MLflow 3.x).

Only rank 0 tracks. Callers pass ``enabled=is_main()`` and may then call every method
unconditionally: a disabled :class:`RunTracker` does nothing and imports nothing::

    tracker = RunTracker(cfg, enabled=info.is_main, run_id_file=out / "mlflow_run_id",
                         resume=resumed_from_checkpoint)
    with tracker:                                  # FINISHED / FAILED / KILLED on exit
        tracker.log_dataset(manifest, "train", context="training")
        tracker.log_metrics({"train/loss": loss}, step=global_step)
        tracker.log_image(grid, "val/predictions", step=global_step)

Metric names carry the phase as a prefix: ``train/`` (per step), ``val/`` (the evaluations during
training), ``eval/`` (the evaluate stage), ``system/`` (MLflow's system metrics).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pix2seq.atomic import atomic_write_text
from pix2seq.config import Config
from pix2seq.tracking.store import default_tracking_uri, ensure_experiment, find_repo_root, mlflow_client

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
MAX_PARAM_VALUE_LENGTH = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_VALUE_LENGTH = 8000


# ---------------------------------------------------------------------------------- run facts


def readable_run_name(kind: str) -> str:
    """The DVC experiment's name under ``dvc exp run`` (the same name ``dvc exp show`` lists), else
    ``<kind>-<YYYYmmdd-HHMMSS>``: never MLflow's random adjective-animal."""
    exp = os.environ.get("DVC_EXP_NAME", "").strip()
    return exp or f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


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


def param_str(value: Any) -> str:
    """A param value as MLflow stores it: strings as is, lists/dicts as JSON, truncated to 6000 chars."""
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


def log_params_once(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> dict[str, str]:
    """Log the params the run does not have yet. MLflow params are immutable: a param that already
    holds a *different* value (a resumed run with an edited config) is recorded as the tag
    ``param_changed.<key>`` ("old -> new") instead; returns those tags."""
    from mlflow.entities import Param, RunTag

    existing = client.get_run(run_id).data.params
    new, changed = [], {}
    for k, v in params.items():
        s = param_str(v)
        if k not in existing:
            new.append(Param(str(k), s))
        elif existing[k] != s:
            changed[f"param_changed.{k}"] = f"{existing[k]} -> {s}"[:MAX_TAG_VALUE_LENGTH]
    for i in range(0, len(new), 100):
        client.log_batch(run_id, params=new[i : i + 100])
    if changed:
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in changed.items()])
    return changed


class RunTracker:
    """One MLflow run: start (new, nested or resumed), log, end. A no-op when ``enabled=False``.

    Args:
        cfg: the resolved config: experiment name and system-metrics flag come from
            ``cfg.tracking``, and ``cfg.flat()`` is logged as params when the run starts.
        enabled: False on non-zero ranks (or to switch tracking off): every method returns at once.
        experiment: overrides ``cfg.tracking.experiment``.
        run_name: the run's display name (new runs only); default :func:`readable_run_name`.
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
        self.run_name = run_name or readable_run_name("train")
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
            self._client = mlflow_client(self.tracking_uri)
        return self._client

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
        self.experiment_id = ensure_experiment(self.experiment, self.tracking_uri)
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
        """Log params (:func:`log_params_once`: a changed value of a resumed run becomes a tag)."""
        if not self.active or not params:
            return
        changed = log_params_once(self.client, self.run_id, params)
        if changed:
            log.warning(
                "resumed run %s: %d param(s) changed since it started: %s",
                self.run_id,
                len(changed),
                sorted(changed),
            )

    def log_config(self, cfg: Config) -> None:
        """The whole resolved config as params (``train.lr``, ``model.backbone``, ...)."""
        self.log_params(cfg.flat())

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.active or not tags:
            return
        from mlflow.entities import RunTag

        items = [RunTag(str(k), str(v)[:MAX_TAG_VALUE_LENGTH]) for k, v in tags.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, tags=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numeric metrics (tensors/NumPy scalars accepted; None and non-numbers skipped)."""
        if not self.active or not metrics:
            return
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

    def log_artifact_as(self, path: PathLike, artifact_file: str) -> None:
        """Upload a file under another name (``checkpoints/best.pt``)."""
        if not self.active:
            return
        import shutil
        import tempfile

        dest_dir, _, name = artifact_file.rpartition("/")
        with tempfile.TemporaryDirectory(prefix="pix2seq-artifact-") as tmp:
            staged = Path(tmp) / name
            try:
                os.link(path, staged)
            except OSError:
                shutil.copyfile(path, staged)
            self.client.log_artifact(self.run_id, str(staged), dest_dir or None)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        """A dict as a JSON/YAML artifact (format from the extension)."""
        if self.active:
            self.client.log_dict(self.run_id, dict(data), artifact_file)

    def log_image(self, image: Any, key: str, step: int) -> None:
        """A uint8 ``(3, H, W)`` image as a step-indexed image (the MLflow UI's image slider)."""
        if self.active:
            array = image.permute(1, 2, 0).contiguous().numpy()
            self.client.log_image(self.run_id, array, key=key, step=int(step), synchronous=True)

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

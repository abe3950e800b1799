"""Where MLflow records live: the tracking URI, the one MLflow client factory, experiments.

Runs go to ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<repo root>/mlflow.db``
(:func:`default_tracking_uri`; MLflow 3 no longer accepts a plain ``./mlruns`` file store as its
default); the registry to ``MLFLOW_REGISTRY_URI``, else the tracking URI. Experiments this module
creates on a local SQLite store keep their artifacts beside the database in ``<repo>/mlruns/``,
whatever the working directory is.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

PathLike = str | os.PathLike[str]


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


def default_registry_uri(tracking_uri: str | None = None) -> str:
    """``$MLFLOW_REGISTRY_URI`` if set, else the tracking URI."""
    return os.environ.get("MLFLOW_REGISTRY_URI", "").strip() or tracking_uri or default_tracking_uri()


def sqlite_path(uri: str) -> Path | None:
    """The database file of ``sqlite:///rel.db`` (relative) or ``sqlite:////abs.db`` (absolute); None
    for any other URI (a server, PostgreSQL, an in-memory database). MLflow and Optuna URIs alike."""
    scheme, sep, rest = uri.partition(":///")
    if not sep or scheme.split("+")[0] != "sqlite":
        return None
    raw = unquote(rest.split("?", 1)[0])
    return None if not raw or raw == ":memory:" else Path(raw)


def mlflow_client(tracking_uri: str | None = None, registry_uri: str | None = None) -> MlflowClient:
    """The MLflow client every module uses (default URIs as above); explicit URIs, no global state."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or default_tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=registry_uri or default_registry_uri(uri))


@contextlib.contextmanager
def sqlite_init_lock(uri: str) -> Iterator[None]:
    """Serialise the first contact with a local sqlite store across processes.

    MLflow creates and migrates a new sqlite database on first use; two processes doing it at once
    (tuning workers, torchrun jobs sharing ``mlflow.db``) race and one fails with
    "duplicate column name". An advisory file lock beside the database prevents it.
    """
    db = sqlite_path(uri)
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


def ensure_experiment(name: str, tracking_uri: str | None = None) -> str:
    """The id of experiment ``name``, created (or restored from deletion) when needed.

    On a local SQLite store a new experiment's artifacts go beside the database (``mlruns/``), not
    into the working directory. Safe against other processes creating it at the same time.
    """
    from mlflow.exceptions import MlflowException

    uri = tracking_uri or default_tracking_uri()
    with sqlite_init_lock(uri):
        client = mlflow_client(uri)
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        db = sqlite_path(uri)
        location = (db.resolve().parent / "mlruns").as_uri() if db is not None else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created concurrently by another process
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

"""MLflow, in one package: the store (:mod:`.store`), training runs (:mod:`.runs`), the model registry
and model-spec resolution (:mod:`.registry`) and the runs of a tuning study (:mod:`.studies`).

Nothing here imports :mod:`pix2seq.tuning` or Optuna; MLflow itself is imported lazily.
"""

from pix2seq.tracking.registry import (
    ModelNotFound,
    ResolvedModel,
    champion_alias,
    champions,
    promote_champion,
    register_model,
    resolve_model,
    task_name,
)
from pix2seq.tracking.runs import RunTracker, file_digest, git_commit, readable_run_name
from pix2seq.tracking.store import (
    default_tracking_uri,
    ensure_experiment,
    find_repo_root,
    mlflow_client,
    sqlite_path,
)

__all__ = [
    "ModelNotFound",
    "ResolvedModel",
    "RunTracker",
    "champion_alias",
    "champions",
    "default_tracking_uri",
    "ensure_experiment",
    "file_digest",
    "find_repo_root",
    "git_commit",
    "mlflow_client",
    "promote_champion",
    "readable_run_name",
    "register_model",
    "resolve_model",
    "sqlite_path",
    "task_name",
]

"""Optuna, in one package: the search space and trial config (:mod:`.space`), the storage and dead
workers' retries (:mod:`.storage`), the trial budget over all workers (:mod:`.budget`) and the study
itself (:mod:`.study`). MLflow bookkeeping goes through :mod:`pix2seq.tracking.studies`."""

from pix2seq.tuning.space import (
    LR_PARAM,
    REPEAT_PARAM,
    search_space,
    suggest_params,
    trial_config,
    trial_output_dir,
)
from pix2seq.tuning.storage import PARENT_RUN_ATTR, make_storage, mask_url, storage_url
from pix2seq.tuning.study import (
    StudyError,
    StudySummary,
    TrialSeededSampler,
    best_overrides,
    best_params,
    config_digest,
    make_pruner,
    make_sampler,
    open_study,
    run_study,
    study_name,
)

__all__ = [
    "LR_PARAM",
    "PARENT_RUN_ATTR",
    "REPEAT_PARAM",
    "StudyError",
    "StudySummary",
    "TrialSeededSampler",
    "best_overrides",
    "best_params",
    "config_digest",
    "make_pruner",
    "make_sampler",
    "make_storage",
    "mask_url",
    "open_study",
    "run_study",
    "search_space",
    "storage_url",
    "study_name",
    "suggest_params",
    "trial_config",
    "trial_output_dir",
]

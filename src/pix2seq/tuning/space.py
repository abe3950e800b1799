"""What a trial tunes and how long it trains: the search space and the trial's config."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import optuna

from pix2seq.config import Config, TuneConfig, config_from_dict

LR_PARAM = "train.lr"  # Optuna parameter names are the config keys they set
REPEAT_PARAM = "train.batch_repeat"
TUNED = (LR_PARAM, REPEAT_PARAM)
EVALS_PER_TRIAL = 4  # when the train section would evaluate less than twice, a trial evaluates ~4 times


def search_space(tcfg: TuneConfig) -> dict[str, dict[str, Any]]:
    """The space as plain data (logged on the study's MLflow run)."""
    return {
        LR_PARAM: {"type": "float", "log": True, "low": tcfg.lr_min, "high": tcfg.lr_max},
        REPEAT_PARAM: {"type": "int", "low": tcfg.repeat_min, "high": tcfg.repeat_max},
    }


def suggest_params(trial: optuna.Trial, tcfg: TuneConfig) -> dict[str, Any]:
    """``{"train.lr": log-uniform in [lr_min, lr_max], "train.batch_repeat": int in [repeat_min, repeat_max]}``."""
    return {
        LR_PARAM: trial.suggest_float(LR_PARAM, tcfg.lr_min, tcfg.lr_max, log=True),
        REPEAT_PARAM: trial.suggest_int(REPEAT_PARAM, tcfg.repeat_min, tcfg.repeat_max),
    }


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "study"


def trial_output_dir(runs_dir: str | os.PathLike[str], study_name: str, number: int) -> Path:
    """``<runs_dir>/<study>/trial-<n>``: every trial its own checkpoints and run id."""
    return Path(runs_dir) / safe_name(study_name) / f"trial-{number}"


def trial_config(cfg: Config, params: dict[str, Any], output_dir: str | os.PathLike[str]) -> Config:
    """``cfg`` with the trial's parameters, its output dir and the trial budget applied (validated).

    Budget: ``tune.trial_minutes > 0`` sets ``train.max_minutes`` (``train.epochs``, or
    ``tune.trial_epochs`` when set, stays an upper bound); else ``tune.trial_epochs > 0`` sets
    ``train.epochs`` (no wall-clock limit); else the ``train`` section's budget is used as is.
    The pruner needs intermediate evaluations: when the evaluation period would give fewer than two
    evaluations within the budget, it is lowered to a quarter of the budget. A trial never resumes
    another run's checkpoints (``train.resume: never``) and never registers a model; with
    ``tune.init_from`` it fine-tunes from that model file (its ``model.init_from``).
    """
    d = cfg.to_dict()
    tr, tu = d["train"], cfg.tune
    tr["lr"] = float(params[LR_PARAM])
    tr["batch_repeat"] = int(params[REPEAT_PARAM])
    tr["output_dir"] = str(output_dir)
    tr["resume"] = "never"
    if tu.init_from:
        d["model"]["init_from"] = tu.init_from
    if tu.trial_minutes > 0:
        tr["max_minutes"] = float(tu.trial_minutes)
        if tu.trial_epochs > 0:
            tr["epochs"] = int(tu.trial_epochs)
    elif tu.trial_epochs > 0:
        tr["epochs"] = int(tu.trial_epochs)
        tr["max_minutes"] = 0.0
    if tr["max_minutes"] > 0:
        if tr["eval_every_minutes"] <= 0 or tr["eval_every_minutes"] > tr["max_minutes"] / 2:
            tr["eval_every_minutes"] = tr["max_minutes"] / EVALS_PER_TRIAL
    elif tr["eval_every_epochs"] <= 0 or tr["eval_every_epochs"] > tr["epochs"] / 2:
        tr["eval_every_epochs"] = max(1, tr["epochs"] // EVALS_PER_TRIAL)
    return config_from_dict(d)


def expected_evaluations(trial_cfg: Config) -> int:
    """How many evaluations a trial of this config reports (the last one at the end of its budget)."""
    tr = trial_cfg.train
    if tr.max_minutes > 0:
        return max(1, math.floor(tr.max_minutes / tr.eval_every_minutes + 1e-9))
    return max(1, tr.epochs // max(1, tr.eval_every_epochs))

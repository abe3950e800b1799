"""What a study found, in the user's terms: every trial's parameters, AP, state and training time,
whether it can recommend anything, and its plots as PNG files.

::

    report = study_report(study, budget="0.5 min of training", start="runs/train/model.pt")
    write_report(study, report, "reports/tune")   # summary.json, trials.csv, *.png
    print(format_report(report))

A study recommends its best parameters only when its trials learned something measurable: trials
too short to leave the AP plateau (every AP below :data:`MIN_USEFUL_AP`) show how tuning works, not
which parameters are better, and the report says so instead of recommending them.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from pix2seq.atomic import atomic_write_text
from pix2seq.evaluation.plots import save_figure
from pix2seq.tuning.space import LR_PARAM, REPEAT_PARAM, TUNED

log = logging.getLogger(__name__)

MIN_USEFUL_AP = 1.0  # below this no trial learned measurably: the trials cannot rank parameters
PLOTS = ("optimization_history", "intermediate_values", "parallel_coordinate", "param_importances")


@dataclass
class TrialRow:
    number: int
    state: str  # COMPLETE, PRUNED, FAIL, RUNNING
    lr: float | None
    batch_repeat: int | None
    ap: float | None  # the objective (COMPLETE) or the last AP reported before pruning
    evaluations: list[float] = field(default_factory=list)  # AP at each evaluation
    train_minutes: float | None = None
    steps: int | None = None
    note: str = ""  # why it was pruned or failed


def _finite(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def trial_rows(study: optuna.Study) -> list[TrialRow]:
    """One row per trial that started (waiting trials left out), in trial order."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.WAITING:
            continue
        evals = [float(v) for _, v in sorted(t.intermediate_values.items())]
        ap = _finite(t.value) if t.state == TrialState.COMPLETE else (evals[-1] if evals else None)
        attrs = t.user_attrs
        note = ""
        if t.state == TrialState.PRUNED:
            note = "diverged (NaN loss)" if "diverged" in attrs else f"pruned after evaluation {len(evals)}"
        elif t.state == TrialState.FAIL:
            note = str(t.system_attrs.get("fail_reason", "failed"))[:120]
        rows.append(
            TrialRow(
                number=t.number,
                state=t.state.name,
                lr=_finite(t.params.get(LR_PARAM)),
                batch_repeat=int(t.params[REPEAT_PARAM]) if REPEAT_PARAM in t.params else None,
                ap=ap,
                evaluations=evals,
                train_minutes=_finite(attrs.get("train_minutes")),
                steps=int(attrs["steps"]) if "steps" in attrs else None,
                note=note,
            )
        )
    return rows


def verdict(rows: list[TrialRow], from_model: bool = False) -> tuple[bool, str]:
    """``(recommended, why)``: may the best complete trial's parameters be recommended?

    ``from_model``: the trials already fine-tune from a trained model (``tune.init_from``), so the
    advice for trials that learned nothing is more time alone.
    """
    complete = [r for r in rows if r.state == "COMPLETE" and r.ap is not None]
    if not complete:
        return False, "no trial completed, so there is nothing to recommend"
    best = max(complete, key=lambda r: r.ap)
    if best.ap < MIN_USEFUL_AP:
        return False, (
            f"no trial learned measurably (best AP {best.ap:.1f}): its trials are too short to rank these "
            "parameters, so this study shows how tuning works and recommends nothing (give trials more "
            + (
                "time, tune.trial_minutes)"
                if from_model
                else "time, tune.trial_minutes, or start them from a trained model, tune.init_from)"
            )
        )
    scored = [r for r in rows if r.ap is not None and r.state in ("COMPLETE", "PRUNED")]
    worst = min(scored, key=lambda r: r.ap)
    spread = best.ap - worst.ap
    if spread < MIN_USEFUL_AP:
        return True, (
            f"trial {best.number} is best (AP {best.ap:.1f}), but every trial is within {spread:.1f} AP of it: "
            "in this range these parameters make little difference"
        )
    return True, (
        f"trial {best.number} is best (AP {best.ap:.1f}), {spread:.1f} AP above the worst "
        f"(trial {worst.number}, {worst.state.lower()})"
    )


def study_report(study: optuna.Study, budget: str, start: str, from_model: bool = False) -> dict[str, Any]:
    """The study as plain data (``summary.json``): what was compared, every trial and the verdict.

    ``budget``: each trial's training budget in words; ``start``: what trials train from
    (``from_model``: a trained model, ``tune.init_from``).
    """
    rows = trial_rows(study)
    recommended, why = verdict(rows, from_model)
    complete = [r for r in rows if r.state == "COMPLETE" and r.ap is not None]
    best = max(complete, key=lambda r: r.ap) if complete else None
    return {
        "study": study.study_name,
        "compared": list(TUNED),
        "objective": "validation AP (COCO) at the end of each trial",
        "budget": budget,
        "start": start,
        "trials": [asdict(r) for r in rows],
        "best_trial": None if best is None else best.number,
        "recommended": recommended,
        "verdict": why,
    }


def save_plots(study: optuna.Study, folder: Path) -> list[Path]:
    """The study's plots as PNG (Optuna's matplotlib backend); a plot that cannot be drawn is skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vm

    n_complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    plots: dict[str, Callable[[], Any]] = {
        "optimization_history": lambda: vm.plot_optimization_history(study),
        "intermediate_values": lambda: vm.plot_intermediate_values(study),
    }
    if n_complete >= 1:
        plots["parallel_coordinate"] = lambda: vm.plot_parallel_coordinate(study, params=list(TUNED))
    if n_complete >= 2:
        plots["param_importances"] = lambda: vm.plot_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
        )
    else:
        log.info("parameter importance needs >= 2 completed trials (%d); not plotted", n_complete)
    folder.mkdir(parents=True, exist_ok=True)
    saved = []
    for name, draw in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = draw()
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(9, 5.5)
            saved.append(save_figure(fig, folder / f"{name}.png", dpi=100))
        except Exception as e:  # noqa: BLE001 - e.g. importance with one distinct value
            log.warning("plot %s skipped: %s: %s", name, type(e).__name__, e)
            plt.close("all")
    return saved


def write_report(
    study: optuna.Study, report: dict[str, Any], folder: str | Path, plots: bool = True
) -> list[Path]:
    """``summary.json``, ``trials.csv`` and (``plots``) the PNG plots into ``folder``; returns the files.

    Plots of an earlier study left in ``folder`` are removed, so every file there describes this one.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in PLOTS:
        (folder / f"{name}.png").unlink(missing_ok=True)
    files = [atomic_write_text(folder / "summary.json", json.dumps(report, indent=2) + "\n")]
    try:
        files.append(atomic_write_text(folder / "trials.csv", study.trials_dataframe().to_csv(index=False)))
    except Exception as e:  # noqa: BLE001
        log.warning("trials table not written: %s", e)
    if plots:
        files.extend(save_plots(study, folder))
    return files


def _cell(value: float | int | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_report(report: dict[str, Any]) -> str:
    """The report as the lines ``pix2seq tune`` and the demo's summary print."""
    trials = report["trials"]
    states = {s: sum(t["state"] == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
    lines = [
        f"study {report['study']}: {len(trials)} trials ({states['COMPLETE']} complete, {states['PRUNED']} "
        f"pruned, {states['FAIL']} failed) over {' x '.join(report['compared'])}; each trained "
        f"{report['budget']} from {report['start']}; objective: {report['objective']}",
        f"  {'trial':>5}  {'train.lr':>9}  {'batch_repeat':>12}  {'AP':>5}  {'state':<9} trained",
    ]
    for t in trials:
        trained = ""
        if t["train_minutes"] is not None:
            trained = f"{t['train_minutes']:.2f} min, {_cell(t['steps'], 'd')} steps"
        lines.append(
            f"  {t['number']:>5}  {_cell(t['lr'], '9.2e')}  {_cell(t['batch_repeat'], '12d')}  "
            f"{_cell(t['ap'], '5.1f')}  {t['state'].lower():<9} {trained}"
            + (f" ({t['note']})" if t["note"] else "")
        )
    lines.append(("recommended: " if report["recommended"] else "no recommendation: ") + report["verdict"])
    return "\n".join(lines)

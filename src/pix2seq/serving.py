"""The servable MLflow pyfunc model: image in, boxes / labels / scores out.

Input (``mlflow models serve`` or ``mlflow.pyfunc.load_model(...).predict``): a DataFrame with a
column ``image`` holding base64-encoded image files (JPEG/PNG), or a list of such strings.
Output: a DataFrame, one row per image, with list-valued columns ``boxes`` (xyxy pixels),
``scores``, ``labels``, ``category_ids`` and ``names``.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import torch

from pix2seq.checkpoint import load_checkpoint, save_checkpoint
from pix2seq.config import Config

ARTIFACT = "checkpoint"
MODEL_NAME_IN_RUN = "model"
_SRC = Path(__file__).resolve().parent


def export_model_file(checkpoint: str | Path, dest: str | Path) -> Path:
    """A training checkpoint -> a slim file (weights, config, vocab, categories; no optimizer state)."""
    ckpt = load_checkpoint(checkpoint, map_location="cpu")
    slim = {k: ckpt[k] for k in ("model", "config", "vocab", "categories")}
    slim["model"] = {k: v.float() if torch.is_floating_point(v) else v for k, v in slim["model"].items()}
    return save_checkpoint(dest, slim)


class Pix2SeqPyfunc(mlflow.pyfunc.PythonModel):
    """mlflow.pyfunc wrapper around :class:`pix2seq.inference.Predictor`."""

    def load_context(self, context):
        from pix2seq.inference import Predictor

        self.predictor = Predictor(context.artifacts[ARTIFACT], device="auto")

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would build a schema from them
        import pandas as pd

        from pix2seq.inference import read_image

        if isinstance(model_input, pd.DataFrame):
            if "image" not in model_input.columns:
                raise ValueError("model input: expected a column named 'image' with base64-encoded image files")
            values = list(model_input["image"])
        else:
            values = list(model_input)
        images = []
        for i, v in enumerate(values):
            raw = v if isinstance(v, bytes | bytearray) else base64.b64decode(str(v), validate=False)
            images.append(read_image(bytes(raw)) if raw else _bad(i))
        threshold = float((params or {}).get("score_threshold", 0.0))
        return pd.DataFrame(self.predictor.predict(images, score_threshold=threshold))


def _bad(i: int) -> torch.Tensor:
    raise ValueError(f"model input row {i}: empty image")


def log_pyfunc_model(tracker: Any, model_file: Path, cfg: Config, register: bool, ap: float) -> str | None:
    """Log the pyfunc model to the tracker's run; register it and move 'champion' when it is the best."""
    if not getattr(tracker, "active", False):
        return None
    import mlflow

    from pix2seq.tracking import promote_champion, register_model

    with _run_context(tracker):
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME_IN_RUN,
            python_model=str(_SRC / "pyfunc_entry.py"),  # models-from-code: nothing pickled
            artifacts={ARTIFACT: str(model_file)},
            code_paths=[str(_SRC)],
            pip_requirements=_requirements(),
        )
    if not register:
        return info.model_uri
    version = register_model(
        tracker.run_id, MODEL_NAME_IN_RUN, cfg.tracking.model_name, metric_value=ap, model_uri=info.model_uri,
        tracking_uri=tracker.tracking_uri,
    )
    promote_champion(cfg.tracking.model_name, version, ap, tracking_uri=tracker.tracking_uri)
    return info.model_uri


class _run_context:
    """Make the tracker's run the active one while logging the model (resumed runs included)."""

    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker
        self.started = False

    def __enter__(self) -> None:
        import mlflow

        active = mlflow.active_run()
        if active is None or active.info.run_id != self.tracker.run_id:
            mlflow.start_run(run_id=self.tracker.run_id, nested=active is not None)
            self.started = True

    def __exit__(self, *exc: Any) -> None:
        import mlflow

        if self.started:
            mlflow.end_run()


def _requirements() -> list[str]:
    from importlib.metadata import version

    pkgs = ["torch", "torchvision", "mlflow", "pyyaml", "pillow", "numpy", "pandas"]
    out = []
    for p in pkgs:
        try:
            out.append(f"{p}=={version(p)}")
        except Exception:
            out.append(p)
    return out

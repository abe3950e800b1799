"""The servable MLflow pyfunc model: image in, boxes / labels / scores out.

Input (``mlflow models serve`` or ``mlflow.pyfunc.load_model(...).predict``): a DataFrame with a
column ``image`` holding base64-encoded image files (JPEG/PNG/WebP; ``data:image/...;base64,``
prefixes and line breaks are accepted), a ``{"image": [...]}`` dict, or a list of such strings
(or of raw bytes). Param ``score_threshold`` (default 0.0) drops weaker detections.
Output: a DataFrame, one row per image, with list-valued columns ``boxes`` (xyxy pixels),
``scores``, ``labels``, ``category_ids`` and ``names``.

The logged model carries an input example (a validation image) and is registered under
``tracking.model_name`` with its task (:mod:`pix2seq.tracking.registry`): serve a task's champion
over HTTP (``mlflow models serve -m models:/pix2seq@champion-<task> --env-manager local``; the venv's
``bin`` must be on PATH: MLflow starts ``uvicorn`` by name)::

    POST /invocations  {"dataframe_split": {"columns": ["image"], "data": [["<base64>"], ...]},
                        "params": {"score_threshold": 0.3}}
    POST /invocations  {"inputs": {"image": ["<base64>", ...]}}
    -> {"predictions": [{"boxes": [[x0, y0, x1, y1], ...], "scores": [...], "labels": [...],
                         "category_ids": [...], "names": [...]}, ...]}

``PIX2SEQ_DEVICE`` (default ``auto``) picks the device the served model runs on.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import Any, NoReturn

import mlflow.pyfunc

from pix2seq.config import Config
from pix2seq.tracking.registry import MODEL_ARTIFACT as ARTIFACT

MODEL_NAME_IN_RUN = "model"
_SRC = Path(__file__).resolve().parent


class Pix2SeqPyfunc(mlflow.pyfunc.PythonModel):
    """mlflow.pyfunc wrapper around :class:`pix2seq.inference.Predictor`."""

    def load_context(self, context):
        from pix2seq.inference import Predictor

        device = os.environ.get("PIX2SEQ_DEVICE", "auto").strip() or "auto"
        self.predictor = Predictor(context.artifacts[ARTIFACT], device=device)

    def predict(
        self, context, model_input, params=None
    ):  # no type hints: MLflow would build a schema from them
        import pandas as pd

        from pix2seq.inference import ImageReadError, read_image

        images = []
        for i, v in enumerate(_image_values(model_input)):
            try:
                images.append(read_image(_decode(i, v)))
            except ImageReadError as e:
                _bad_input(f"model input row {i}: {str(e).removeprefix('<bytes>: ')}")
        try:
            threshold = float((params or {}).get("score_threshold", 0.0) or 0.0)
        except (TypeError, ValueError):
            _bad_input(f"params: score_threshold must be a number, got {params.get('score_threshold')!r}")
        rows = self.predictor.predict(images, score_threshold=threshold) if images else []
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))


OUTPUT_COLUMNS = ("boxes", "scores", "labels", "category_ids", "names")


def _bad_input(message: str) -> NoReturn:
    from mlflow.exceptions import MlflowException

    raise MlflowException.invalid_parameter_value(message)  # HTTP 400 with this message when served


def _image_values(model_input: Any) -> list[Any]:
    """The encoded images of every accepted input layout, in order."""
    import numpy as np
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if "image" in model_input.columns:
            return list(model_input["image"])
        if model_input.shape[1] == 1 and not isinstance(model_input.columns[0], str):  # unnamed column
            return list(model_input.iloc[:, 0])
        _bad_input(
            f"model input: expected a column named 'image' with base64-encoded image files, "
            f"got columns {list(model_input.columns)}"
        )
    if isinstance(model_input, pd.Series):
        return list(model_input)
    if isinstance(model_input, dict):
        if "image" not in model_input:
            _bad_input(f"model input: expected the key 'image', got {sorted(map(str, model_input))}")
        v = model_input["image"]
        return (
            [v] if isinstance(v, str | bytes | bytearray) else list(np.asarray(v, dtype=object).reshape(-1))
        )
    if isinstance(model_input, str | bytes | bytearray):
        return [model_input]
    if isinstance(model_input, np.ndarray):
        return list(model_input.reshape(-1))
    values = list(model_input)
    return [v["image"] if isinstance(v, dict) and "image" in v else v for v in values]


def _decode(i: int, value: Any) -> bytes:
    """One input cell -> the encoded image's bytes (raw bytes pass through; strings are base64)."""
    if isinstance(value, bytes | bytearray):
        raw = bytes(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("data:") and "," in text:  # data:image/jpeg;base64,....
            text = text.split(",", 1)[1]
        text = "".join(text.split())  # `base64` wraps lines at 76 characters
        altchars = b"-_" if ("-" in text or "_" in text) else None  # the URL-safe alphabet
        try:
            raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=altchars, validate=True)
        except (binascii.Error, ValueError):
            _bad_input(f"model input row {i}: not a base64-encoded image file")
    else:
        _bad_input(f"model input row {i}: expected a base64 string, got {type(value).__name__}")
    if not raw:
        _bad_input(f"model input row {i}: empty image")
    return raw


def model_signature():
    """Input: a string column ``image``; param ``score_threshold``. Without a params schema MLflow
    drops every param at predict time, so the threshold could not be passed at all."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "image")]),
        params=ParamSchema([ParamSpec("score_threshold", "double", 0.0)]),
    )


def input_example(image: Path) -> Any:
    """The served model's input example: one (validation) image, base64-encoded, as the request
    body's ``image`` column."""
    import pandas as pd

    return pd.DataFrame({"image": [base64.b64encode(image.read_bytes()).decode("ascii")]})


def log_pyfunc_model(
    tracker: Any, model_file: Path, cfg: Config, data: Any, register: bool, ap: float
) -> str | None:
    """Log the pyfunc model (with a validation image as input example) to the tracker's run; register
    it under its task (the validation set) and move that task's champion alias when it is the best.

    ``data``: the run's :class:`~pix2seq.data.loaders.DetectionData`. Returns the logged model's URI.
    """
    if not getattr(tracker, "active", False):
        return None
    import mlflow

    from pix2seq.tracking import champion_alias, file_digest, promote_champion, register_model, task_name

    with _run_context(tracker):
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME_IN_RUN,
            python_model=str(_SRC / "pyfunc_entry.py"),  # models-from-code: nothing pickled
            artifacts={ARTIFACT: str(model_file)},
            code_paths=[str(_SRC)],
            pip_requirements=_requirements(),
            signature=model_signature(),
            input_example=input_example(data.example_image()),
        )
    if not register:
        return info.model_uri
    digest = file_digest(data.val_manifest)
    task = task_name(Path(cfg.data.root).name, digest)
    name = cfg.tracking.model_name
    version = register_model(
        name,
        tracker.run_id,
        info.model_id,
        ap,
        task=task,
        val_digest=digest,
        tags={"dataset": data.name},
        tracking_uri=tracker.tracking_uri,
    )
    moved = promote_champion(name, version, tracking_uri=tracker.tracking_uri)
    alias = champion_alias(task)
    print(
        f"registered {name} v{version} (task {task}): " + (f"now {alias}" if moved else f"{alias} unchanged")
    )
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

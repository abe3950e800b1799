"""Shared fixtures. Nothing here may reach the network."""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import pytest  # noqa: E402

from pix2seq.config import GeneratedDataConfig  # noqa: E402
from pix2seq.data.synthetic import write_generated_dataset  # noqa: E402


@pytest.fixture(scope="session")
def tiny_generated(tmp_path_factory) -> tuple:
    """A small generated COCO-format dataset: (root, GeneratedDataConfig)."""
    root = tmp_path_factory.mktemp("generated")
    gcfg = GeneratedDataConfig(image_size=64, num_train=24, num_val=8, num_classes=3, max_objects=4,
                               min_object_size=8, max_object_size=24)
    write_generated_dataset(gcfg, root)
    return root, gcfg

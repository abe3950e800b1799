"""pix2seq.precision: train.amp auto picks bf16 where it is measured faster, once per machine."""

from __future__ import annotations

import json

import pytest
import torch

from pix2seq import precision
from pix2seq.errors import Pix2SeqError
from pix2seq.precision import FORCE_ENV, autocast_dtype, choose


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """No forcing env, a private cache file, and a fake measurement that counts its calls."""
    monkeypatch.delenv(FORCE_ENV, raising=False)
    cache = tmp_path / "precision.json"
    monkeypatch.setenv(precision.CACHE_ENV, str(cache))
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    calls = []
    result = {
        "fp32_per_s": 10.0,
        "bf16_per_s": 20.0,
        "channels_last_fp32": True,
        "channels_last_bf16": True,
        "step_ms": {"fp32": {"1": 4.0, "16": 18.0}, "bf16": {"1": 6.0, "16": 12.0}},
    }

    def fake() -> dict:
        calls.append(1)
        return dict(result)

    monkeypatch.setattr(precision, "measure", fake)
    precision._choose.cache_clear()
    yield cache, calls, result
    precision._choose.cache_clear()


def test_explicit_modes_and_cuda(measured):
    assert autocast_dtype("off", "cpu") is None
    assert autocast_dtype("off", "cuda") is None
    assert autocast_dtype("auto", "cuda") is torch.bfloat16
    assert choose("auto", "cuda").channels_last
    assert autocast_dtype("bf16", "cpu") is torch.bfloat16
    with pytest.raises(ValueError, match="train.amp"):
        choose("fp16", "cpu")


def test_auto_on_cpu_follows_the_measurement_and_caches_it(measured):
    cache, calls, result = measured
    c = choose("auto", "cpu")
    assert c.dtype is torch.bfloat16 and c.channels_last
    assert (c.fp32_per_s, c.bf16_per_s) == (10.0, 20.0)
    assert c.tags() == {
        "precision.dtype": "bf16",
        "precision.reason": "measured on this CPU: bf16 faster",
        "precision.fp32_per_s": "10.000",
        "precision.bf16_per_s": "20.000",
        "precision.channels_last": "true",
        "precision.step_fp32_rows": "1",
    }
    assert "fp32 10.00/s, bf16 20.00/s" in c.describe() and "decode step fp32 at 1 row" in c.describe()
    # the decode step: float32 where it measured faster, at the measured size nearest in log scale
    assert [c.step_dtype(r) for r in (1, 2, 4, 5, 16, 64)] == [None] * 3 + [torch.bfloat16] * 3
    # written once, keyed by CPU model and torch version; a new process reads it back
    entries = json.loads(cache.read_text())
    (key,) = entries
    assert torch.__version__ in key and entries[key]["bf16_per_s"] == 20.0
    precision._choose.cache_clear()
    assert choose("auto", "cpu").dtype is torch.bfloat16
    assert len(calls) == 1
    # where bf16 measured slower: float32, and the default layout (float32 stays bit-identical)
    entries[key].update(fp32_per_s=30.0)
    cache.write_text(json.dumps(entries))
    precision._choose.cache_clear()
    c = choose("auto", "cpu")
    assert c.dtype is None and not c.channels_last and c.reason == "measured on this CPU: fp32 faster"
    assert c.step_dtype(16) is None and "precision.step_fp32_rows" not in c.tags()
    assert len(calls) == 1
    # train.amp: bf16 is bf16 at every step; an entry from before the step was timed is measured again
    precision._choose.cache_clear()
    assert choose("bf16", "cpu").step_dtype(1) is torch.bfloat16
    del entries[key]["step_ms"]
    cache.write_text(json.dumps(entries))
    precision._choose.cache_clear()
    choose("auto", "cpu")
    assert len(calls) == 2 and "step_ms" in json.loads(cache.read_text())[key]


def test_forced_and_unsupported_cpus_do_not_measure(measured, monkeypatch):
    _, calls, _ = measured
    monkeypatch.setenv(FORCE_ENV, "bf16")
    assert choose("auto", "cpu").dtype is torch.bfloat16
    monkeypatch.setenv(FORCE_ENV, "fp32")
    c = choose("auto", "cpu")
    assert c.dtype is None and FORCE_ENV in c.reason
    monkeypatch.setenv(FORCE_ENV, "fast")
    with pytest.raises(Pix2SeqError, match=FORCE_ENV):
        choose("auto", "cpu")
    monkeypatch.delenv(FORCE_ENV)
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    c = choose("auto", "cpu")
    assert c.dtype is None and "no native bf16" in c.reason
    assert calls == []


def test_a_corrupt_cache_is_measured_again(measured):
    cache, calls, _ = measured
    cache.write_text("{not json")
    assert choose("auto", "cpu").dtype is torch.bfloat16
    assert len(calls) == 1 and json.loads(cache.read_text())


def test_the_real_measurement_runs_both_precisions():
    m = precision.measure(rounds=1)
    assert m["fp32_per_s"] > 0 and m["bf16_per_s"] > 0
    assert isinstance(m["channels_last_bf16"], bool)
    step = m["step_ms"]
    assert {dtype: sorted(step[dtype]) for dtype in step} == {"fp32": ["1", "16"], "bf16": ["1", "16"]}
    assert all(0 < ms < 1000 for d in step.values() for ms in d.values())
    assert step["fp32"]["16"] > step["fp32"]["1"]  # 16 rows are more work than one
    assert torch.get_num_threads() == 1  # restored (conftest runs one thread)

"""The typed config: every error names its key."""

from __future__ import annotations

import pytest
import yaml

from pix2seq.config import Config, ConfigError, config_from_dict, load_config, save_config
from pix2seq.vocab import Vocab


def test_defaults_validate():
    cfg = config_from_dict({})
    assert isinstance(cfg, Config)
    assert cfg.model.backbone == "resnet50" and cfg.tokenizer.bins == 1000


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"train": {"lrr": 1e-3}}, "train.lrr"),
        ({"bogus": 1}, "bogus"),
        ({"model": {"d_model": "big"}}, "model.d_model"),
        ({"train": {"lr": -1e-3}}, "train.lr"),
        ({"tokenizer": {"bins": 1}}, "tokenizer.bins"),
        ({"model": {"backbone": "vgg"}}, "model.backbone"),
        ({"model": {"heads": 7}}, "model.heads"),
        ({"train": {"betas": [0.9]}}, "train.betas"),
        ({"data": {"generated": {"min_objects": 5, "max_objects": 2}}}, "data.generated.min_objects"),
        ({"tokenizer": {"vocab_size": 50, "bins": 100}}, "tokenizer.vocab_size"),
        ({"train": {"batch_repeat": 0}}, "train.batch_repeat"),
        ({"eval": {"use_cache": True}}, "eval.use_cache"),
        ({"train": {"compile": "yes"}}, "train.compile"),
        ({"model": {"pos_temperature": 1.0}}, "model.pos_temperature"),
        ({"model": {"coord_init": "learned"}}, "model.coord_init"),
        ({"tokenizer": {"class_weight": -1}}, "tokenizer.class_weight"),
        ({"eval": {"coord_window": 1.5}}, "eval.coord_window"),
        ({"tokenizer": {"vocab": "tf"}}, "tokenizer.vocab"),
        ({"model": {"pixels": "raw"}}, "model.pixels"),
        ({"model": {"stem_pool": "avg"}}, "model.stem_pool"),
        ({"model": {"ln_eps": 0}}, "model.ln_eps"),
        ({"model": {"max_seq_len": 500}}, "model.max_seq_len"),  # 100 objects need 501
    ],
)
def test_bad_values_name_the_key(values, key):
    with pytest.raises(ConfigError) as e:
        config_from_dict(values)
    assert str(e.value).startswith(key + ":"), str(e.value)


def test_more_categories_than_vocab_holds():
    with pytest.raises(ConfigError, match=r"^tokenizer.vocab_size: .*81 categories"):
        Vocab(num_classes=81, bins=100, vocab_size=150)


def test_overrides_and_types():
    cfg = config_from_dict(
        {}, ["train.lr=1e-3", "model.backbone=resnet18", "data.detr_scales=[320,352]", "train.epochs=3"]
    )
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.model.backbone == "resnet18"
    assert cfg.data.detr_scales == [320, 352]
    assert cfg.train.epochs == 3
    with pytest.raises(ConfigError, match="^train.nope:"):
        config_from_dict({}, ["train.nope=1"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        config_from_dict({}, ["train.lr"])


def test_int_accepted_for_float_but_not_bool_for_int():
    assert config_from_dict({"train": {"lr": 1}}).train.lr == 1.0
    with pytest.raises(ConfigError, match="^train.epochs:"):
        config_from_dict({"train": {"epochs": True}})


def test_load_save_roundtrip(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"seed": 3, "train": {"lr": 2e-4}}))
    cfg = load_config(p, ["model.d_model=128"])
    out = tmp_path / "run" / "config.yaml"
    save_config(cfg, out)
    again = load_config(out)
    assert again == cfg
    assert again.flat()["train.lr"] == pytest.approx(2e-4)
    assert not list(out.parent.glob(".*.tmp"))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("train:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"^train.lr: .*\(in .*wrong.yaml\)"):
        load_config(wrong)


def test_yaml_booleans_for_on_off_choices():
    assert config_from_dict({"train": {"amp": False}}).train.amp == "off"
    assert config_from_dict({}, ["train.amp=off"]).train.amp == "off"

"""The typed config: every error names its key."""

from __future__ import annotations

import dataclasses
import typing

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


# ------------------------------------------------------------------ every key refuses a bad value


def _fields(cls, prefix: str = ""):
    """``(dotted key, annotation, default)`` of every leaf field below the dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _fields(tp, key + ".")
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            yield key, tp, default


def _generic_bad_values(tp, default) -> list:
    """Values of the key's type that can never work, whatever the key: non-finite or negative
    numbers, strings with a NUL, an empty string/list where the default is not empty, a choice that
    does not exist, a wrong type. Keys whose type has none get [] (the test then names them)."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return ["no-such-choice", 3]
    if tp is bool:
        return ["maybe", 2]
    if tp is int:
        return [-1, 1.5, "many"]
    if tp is float:
        return [float("nan"), float("inf"), -1.0, "fast"]
    if tp is str:
        return ["a\x00b", "line\nbreak", 5] + ([""] if default else [])
    if origin is list:
        (item,) = typing.get_args(tp)
        return ["not a list"] + ([[]] if default else []) + [[v] for v in _generic_bad_values(item, None)[:1]]
    return []


# keys where one of the generic values above is legitimate, with the value that is (none today:
# every number is >= 0; add "section.key": value here, plus a bad value below, for a key that may be
# negative and also list it in pix2seq.config.SIGNED_KEYS)
GENERIC_VALUE_IS_VALID: dict[str, object] = {}

# bad values no generic rule catches: ranges, zero periods, cross-field rules (one line each)
SPECIFIC_BAD_VALUES = [
    ("data.image_size", 16),
    ("data.scale_min", 0.0),
    ("data.hflip", 1.5),
    ("data.val_split", "train2017"),
    ("data.generated.num_classes", 11),
    ("data.generated.num_classes", 0),
    ("data.generated.num_train", 0),
    ("data.generated.num_val", 0),
    ("data.generated.max_objects", 0),
    ("data.generated.max_object_size", 200),
    ("data.download.base_url", "images.cocodataset.org"),
    ("data.download.workers", 0),
    ("data.download.timeout_s", 0),
    ("data.prepare.max_bad_fraction", 1.5),
    ("tokenizer.bins", 1),
    ("tokenizer.max_instances", 0),
    ("tokenizer.input_dropout", 1.0),
    ("model.d_model", 0),
    ("model.heads", 7),
    ("model.mlp_dim", 0),
    ("model.decoder_layers", 0),
    ("model.pos_temperature", 1.0),
    ("model.dropout", 1.0),
    ("model.drop_path", 1.0),
    ("train.lr", 0.0),
    ("train.epochs", 0),
    ("train.batch_size", 0),
    ("train.batch_repeat", 0),
    ("train.accumulate", 0),
    ("train.betas", [0.9]),
    ("train.betas", [0.9, 1.0]),
    ("train.warmup_fraction", 1.0),
    ("train.final_lr_fraction", 1.5),
    ("train.keep_checkpoints", 0),
    ("train.checkpoint_every_steps", 0),
    ("train.log_every_steps", 0),
    ("eval.top_p", 0.0),
    ("eval.temperature", 0.0),
    ("eval.beam_size", 0),
    ("eval.coord_window", 1.5),
    ("tune.lr_min", 0.0),
    ("tune.repeat_min", 0),
    ("tune.n_trials", 0),
    ("tune.storage", "optuna.db"),
]


def _assert_refused(key: str, value) -> str:
    tree: dict = {}
    node = tree
    *sections, leaf = key.split(".")
    for s in sections:
        node = node.setdefault(s, {})
    node[leaf] = value
    try:
        config_from_dict(tree)
    except ConfigError as e:
        msg = str(e)
        section, leaf = key.rsplit(".", 1) if "." in key else ("", key)
        # a rule between two keys ("data.scale_min: need 0 < scale_min <= scale_max") names both
        named = msg.startswith((f"{key}:", f"{key}[")) or (
            msg.startswith(f"{section}.") and leaf in msg.split(":", 1)[1]
        )
        assert named, f"{key}={value!r}: the message does not name the key: {msg}"
        assert "\n" not in msg, f"{key}={value!r}: not one line: {msg!r}"
        return msg
    raise AssertionError(
        f"{key}={value!r} was accepted; refuse it in pix2seq.config.validate (or, if the value is valid "
        "for this key, list it in GENERIC_VALUE_IS_VALID and pix2seq.config.SIGNED_KEYS with a bad value "
        "in SPECIFIC_BAD_VALUES)"
    )


def test_every_key_of_every_section_refuses_a_bad_value():
    """Walks the dataclasses, so a key another branch adds is covered without touching this test."""
    uncovered, tried = [], 0
    for key, tp, default in _fields(Config):
        values = [
            v for v in _generic_bad_values(tp, default) if v != GENERIC_VALUE_IS_VALID.get(key, object())
        ]
        values += [v for k, v in SPECIFIC_BAD_VALUES if k == key]
        if not values:
            uncovered.append(f"{key} ({tp})")
        for v in values:
            _assert_refused(key, v)
            tried += 1
    assert not uncovered, f"keys without a bad-value case (add one to SPECIFIC_BAD_VALUES): {uncovered}"
    assert tried > 300


@pytest.mark.parametrize(("key", "value"), SPECIFIC_BAD_VALUES)
def test_specific_bad_values(key, value):
    _assert_refused(key, value)


def test_the_issue_rows_name_the_key_and_what_to_do():
    for override, message in [
        ("train.log_every_steps=0", "train.log_every_steps: must be >= 1, got 0"),
        ("data.prepare.min_box_size=-1", "data.prepare.min_box_size: must be >= 0 pixels, got -1"),
        ("data.prepare.min_box_size=.nan", "data.prepare.min_box_size: must be a finite number, got nan"),
        ("data.download.timeout_s=0", "data.download.timeout_s: must be > 0 seconds, got 0"),
        ("train.lr=.inf", "train.lr: must be a finite number, got inf"),
        ("train.output_dir=", "train.output_dir: must not be empty (default 'runs/train')"),
        (
            "data.generated.num_classes=11",
            "data.generated.num_classes: must be in [1, 10] (one shape per class), got 11",
        ),
        (
            "train.lr=[1",
            "train.lr: not valid YAML: expected ',' or ']', but got '<stream end>' (line 1, column 3) in '[1'",
        ),
        (
            "x=a: b: c",
            "x: not valid YAML: mapping values are not allowed here (line 1, column 5) in 'a: b: c'",
        ),
    ]:
        with pytest.raises(ConfigError) as e:
            config_from_dict({}, [override])
        assert str(e.value) == message


def test_bad_params_files_name_the_file(tmp_path):
    binary = tmp_path / "params.bin"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError, match=r"params.bin: not a YAML text file \(byte 128 is not UTF-8\)$"):
        load_config(binary)
    with pytest.raises(ConfigError, match=r": is a directory, not a regular file; refused \(not read\)"):
        load_config(tmp_path)
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"seed: 1\x00")
    with pytest.raises(ConfigError, match=r"nul.yaml: not valid YAML: unacceptable character #x0000"):
        load_config(nul)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just text\n")
    with pytest.raises(
        ConfigError, match=r"scalar.yaml: the top level must be a mapping of sections, got str"
    ):
        load_config(scalar)
    with pytest.raises(ConfigError, match=r"^config: expected a mapping of sections, got str"):
        config_from_dict("x")  # e.g. a crafted checkpoint's config


def test_generated_class_limit_matches_the_shapes():
    from pix2seq.config import GENERATED_MAX_CLASSES
    from pix2seq.data.synthetic import SHAPES

    assert len(SHAPES) == GENERATED_MAX_CLASSES

"""One typed configuration, loaded from ``params.yaml`` with ``key.sub=value`` overrides.

Every section is a dataclass. Loading rejects unknown keys (with a "did you mean" for a near miss),
wrong types and impossible values with a :class:`ConfigError` whose message names the offending key
(``train.lr``), so a typo in ``params.yaml`` or on the command line fails before any work starts.

Two things make the DVC pipeline exact (``tests/test_pipeline.py``):

- :func:`recording_reads` collects the dotted keys code reads while a block runs, so a test can
  check that every stage lists exactly the keys it reads under ``params:`` in ``dvc.yaml``;
- fields marked :data:`RUNTIME` change how a stage runs or where it reports (worker counts,
  checkpoint cadence, MLflow), never what it writes, so DVC does not track them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import math
import os
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from pix2seq.atomic import atomic_write_text
from pix2seq.errors import Pix2SeqError
from pix2seq.files import FileReadError, read_regular

# data.generated draws one shape per class (pix2seq.data.synthetic.SHAPES); a test keeps them equal
GENERATED_MAX_CLASSES = 10


class ConfigError(Pix2SeqError, ValueError):
    """A bad configuration value; the message starts with the dotted key (or the file)."""


# A field that changes how a stage runs or where it reports, never what it writes (DVC ignores it).
RUNTIME = {"runtime": True}

# ----------------------------------------------------------------------------- read recording

_recorders: list[set[str]] = []  # active recording_reads() blocks
_paused = 0  # > 0 while the config reads itself (to_dict, flat, repr, eq)


class Section:
    """Base of every config section: reads of its fields are recorded while :func:`recording_reads`
    is active (instances marked by :func:`untracked` excepted). ``_keys`` maps a field name to its
    dotted key; it is filled once for every section class below."""

    _keys: ClassVar[dict[str, str]] = {}
    _untracked: ClassVar[bool] = False
    __hash__ = None  # mutable

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        with _not_recorded():
            return all(getattr(self, f.name) == getattr(other, f.name) for f in dataclasses.fields(self))

    def __repr__(self) -> str:
        with _not_recorded():
            inner = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return f"{type(self).__name__}({inner})"

    def __getattribute__(self, name: str) -> Any:
        value = object.__getattribute__(self, name)
        if _recorders and not _paused:
            key = type(self)._keys.get(name)
            if key is not None and not object.__getattribute__(self, "_untracked"):
                for r in _recorders:
                    r.add(key)
        return value


@contextlib.contextmanager
def recording_reads() -> Iterator[set[str]]:
    """Yield the set of dotted keys (``train.lr``) that code reads from any config while the block runs."""
    keys: set[str] = set()
    _recorders.append(keys)
    try:
        yield keys
    finally:
        _recorders.remove(keys)


@contextlib.contextmanager
def _not_recorded() -> Iterator[None]:
    global _paused
    _paused += 1
    try:
        yield
    finally:
        _paused -= 1


def untracked(*sections: Section) -> None:
    """Reads of these section instances are not recorded: their values did not come from params.yaml
    (e.g. the model config a checkpoint carries)."""
    for s in sections:
        object.__setattr__(s, "_untracked", True)


@dataclass(repr=False, eq=False)
class GeneratedDataConfig(Section):
    """The offline dataset of coloured shapes on textured backgrounds (``data.source: generated``)."""

    image_size: int = 128
    num_train: int = 2000
    num_val: int = 200
    num_classes: int = 4
    min_objects: int = 1
    max_objects: int = 6
    min_object_size: int = 8
    max_object_size: int = 48
    seed: int = 0


@dataclass(repr=False, eq=False)
class DownloadConfig(Section):
    """Where COCO 2017 comes from and how much of it (``data.source: coco``)."""

    base_url: str = "http://images.cocodataset.org"
    # all: train2017 + val2017 + annotations; val: val2017 + annotations only.
    subset: Literal["all", "val"] = "all"
    max_train_images: int = 0  # > 0: keep only the first N train images (small disks).
    workers: int = field(default=4, metadata=RUNTIME)
    timeout_s: float = field(default=60.0, metadata=RUNTIME)
    retries: int = field(default=3, metadata=RUNTIME)
    verify_checksums: bool = True


@dataclass(repr=False, eq=False)
class PrepareConfig(Section):
    max_bad_fraction: float = 0.01  # fail the stage when more images than this are unreadable
    # boxes with zero width or height are always dropped (the official rule); > 0: also boxes
    # narrower or shorter than this (pixels)
    min_box_size: float = 0.0
    check_images: bool = True  # decode every image once to catch truncated files


@dataclass(repr=False, eq=False)
class LocalDataConfig(Section):
    """Your own COCO-format data, anywhere on disk (``data.source: local``): the download stage links
    these files into ``data.root`` (symlinks, nothing is copied) and prepare validates them there."""

    train_annotations: str = ""  # COCO instances JSON of the training split
    train_images: str = ""  # the folder its images' file_name entries are relative to
    val_annotations: str = ""
    val_images: str = ""


@dataclass(repr=False, eq=False)
class DataConfig(Section):
    # generated: the offline shapes; coco: COCO 2017, downloaded; local: your files (data.local.*)
    source: Literal["generated", "coco", "local"] = "generated"
    root: str = "data/generated"  # dataset root: <root>/annotations, <root>/<split images>
    train_split: str = "train2017"
    val_split: str = "val2017"
    prepared_dir: str = "data/prepared"  # manifests written by the prepare stage
    image_size: int = 640  # side of the square padded canvas the model sees
    augment: Literal["lsj", "detr", "none"] = "lsj"
    scale_min: float = 0.3  # large-scale jitter range
    scale_max: float = 2.0
    hflip: float = 0.5
    detr_scales: list[int] = field(default_factory=lambda: [480, 512, 544, 576, 608, 640])
    detr_crop: bool = True
    color_jitter: float = 0.0
    # the samples depend only on the seed, not on which worker loads them
    num_workers: int = field(default=2, metadata=RUNTIME)
    max_val_images: int = 0  # > 0: evaluate on the first N validation images only
    generated: GeneratedDataConfig = field(default_factory=GeneratedDataConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    local: LocalDataConfig = field(default_factory=LocalDataConfig)


@dataclass(repr=False, eq=False)
class TokenizerConfig(Section):
    """Boxes <-> tokens and the sequence augmentation (spec sections 1-3)."""

    bins: int = 1000
    max_instances: int = 100
    # token layout: compact (PAD 0, PROMPT 1, NOISE 2, the classes, the bins) or official
    # (google-research/pix2seq's ids: prompt 10, NOISE 30, 100 + category id, 1000 + bin; 3000 tokens)
    vocab: Literal["compact", "official"] = "compact"
    vocab_size: int = 0  # 0: derived (compact: specials + classes + bins; official: 3000)
    # object order in a sequence: random (official, redrawn every time a sample is drawn), raster
    # (top-to-bottom, then left-to-right), area (largest first) or none (annotation order)
    order: Literal["random", "raster", "area", "none"] = "random"
    augment_sequence: bool = True  # fill every training sequence to max_instances with noise objects
    noise_duplicates: bool = True
    noise_shifted: bool = True
    noise_random: bool = True
    noise_class: Literal["noise", "random"] = "noise"  # target class of noise objects
    noise_coord_weight: float = 0.0
    noise_class_weight: float = 1.0
    class_weight: float = 1.0  # loss weight of real objects' class token (the paper: 1)
    eos_weight: float = 0.1
    class_corruption: bool = True  # input class tokens -> random class / NOISE
    input_dropout: float = 0.0  # probability of replacing an input token by a random one of its type
    jitter_std: float = 0.05  # duplicates: truncated-normal jitter, fraction of box size
    # coordinate targets: 0 = one-hot (the paper); s > 0 = a Gaussian over the bins with std s bins
    # around the true bin (not in the paper; neighbouring bins earn partial credit)
    coord_sigma: float = 0.0


@dataclass(repr=False, eq=False)
class ModelConfig(Section):
    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = "resnet50"
    pretrained: bool = False  # torchvision ImageNet weights (downloaded by torchvision on first use)
    backbone_stage: Literal["layer2", "layer3", "layer4"] = "layer4"  # strides 8, 16, 32 (C5)
    # auto: frozen BN with pretrained weights, SyncBatchNorm on several GPUs, BatchNorm otherwise;
    # group: GroupNorm, independent of the batch (exact multi-process equivalence on CPU)
    backbone_norm: Literal["auto", "batch", "frozen", "group"] = "auto"
    d_model: int = 256
    encoder_layers: int = 6
    decoder_layers: int = 6
    heads: int = 8
    mlp_dim: int = 1024
    dropout: float = 0.1
    drop_path: float = 0.1
    attention: Literal["auto", "sdpa", "math"] = "auto"  # auto: SDPA on GPU, matmul+softmax on CPU
    # coordinate-token embeddings at init: random (the paper) or a 1-D sine-cosine code of the bin,
    # so neighbouring bins start out similar (as inputs and as output classifiers)
    coord_init: Literal["random", "sincos"] = "random"
    # temperature of the image's 2-D sine-cosine positions (frequencies 1 .. 1/T per feature cell);
    # a small grid (8x8 at 128 px) leaves most of 10000's frequencies flat across the image
    pos_temperature: float = 10000.0
    # not in the paper: at the positions that predict an object's class, cross-attention gets an
    # additive prior, a Gaussian (log) around the box the four coordinates before it name, so it
    # looks at the object before the decoder has learnt to read boxes from tokens
    box_attention: bool = False
    # The official model's conventions (all five together compute google-research/pix2seq's
    # function; `pix2seq weights convert` writes them). Each default keeps this project's behaviour.
    # pixels: imagenet = uint8 canvas padded with 0, ImageNet mean/std inside the model (what
    # torchvision's weights expect); official = float [0, 1] canvas resized in float, padded with
    # 0.3, no mean/std
    pixels: Literal["imagenet", "official"] = "imagenet"
    # the stem's 3x3/2 max-pool: torch (pad 1 on every side) or same (TensorFlow's SAME: an even
    # input is padded 0 before / 1 after, an odd one 1 / 1)
    stem_pool: Literal["torch", "same"] = "torch"
    ln_eps: float = 1e-5  # every LayerNorm's epsilon (the official code: 1e-6)
    # image positions: false = feature-cell indices 0..n-1; true = i / (n - 1) * 2 pi, a 1-D code
    # when the grid has one row or column (the official code)
    pos_normalize: bool = False
    max_seq_len: int = 0  # decoder positions; 0: 5 * tokenizer.max_instances + 1 (official: 512)
    # start training from these weights (a fine-tune: fresh optimizer and schedule): official:NAME
    # (`pix2seq weights download --list`), a model.pt or a training checkpoint; empty: from scratch
    init_from: str = ""


@dataclass(repr=False, eq=False)
class TrainConfig(Section):
    epochs: int = 300
    max_minutes: float = 0.0  # > 0: a wall-clock budget; the schedule is laid out over it
    batch_size: int = 4  # distinct images per process per step
    batch_repeat: int = 2  # k augmented copies of every image in a batch
    accumulate: int = 1
    lr: float = 5e-4
    backbone_lr_mult: float = 0.1
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_epochs: float = 10.0
    warmup_fraction: float = 0.0  # > 0 overrides warmup_epochs (fraction of all steps)
    final_lr_fraction: float = 0.0
    grad_clip: float = 0.1
    amp: Literal["auto", "bf16", "off"] = "auto"
    compile: bool = False
    channels_last: bool = False
    fused_adamw: bool = True  # fused AdamW kernel on CUDA and CPU
    eval_every_epochs: int = 10
    eval_every_minutes: float = 0.0  # > 0: also evaluate on this wall-clock period
    checkpoint_every_steps: int = field(default=500, metadata=RUNTIME)
    keep_checkpoints: int = field(default=2, metadata=RUNTIME)
    log_every_steps: int = 20
    output_dir: str = "runs/train"
    resume: Literal["auto", "never"] = field(default="auto", metadata=RUNTIME)


@dataclass(repr=False, eq=False)
class EvalConfig(Section):
    batch_size: int = 0  # 0: chosen for the device (engine.eval_batch_size)
    decoding: Literal["greedy", "nucleus", "beam"] = "greedy"
    top_p: float = 0.4
    temperature: float = 1.0
    beam_size: int = 4
    constrained: bool = True
    # coordinate readout: 0 = the generated token's bin (the paper); w > 0 = the expected bin within
    # w * (bins - 1) of it (not in the paper; see pix2seq.decoding)
    coord_window: float = 0.0
    # the decode step: auto (CUDA graph on CUDA, eager elsewhere), eager (off), graph, compile, static;
    # every one decodes the same tokens, so it only changes how the stage runs
    step: Literal["auto", "eager", "graph", "compile", "static"] = field(default="auto", metadata=RUNTIME)
    backend: Literal["faster_coco_eval", "pycocotools"] = "faster_coco_eval"
    num_vis: int = 16  # images in the prediction grid
    output_dir: str = "reports/eval"
    checkpoint: str = ""  # empty: <train.output_dir>/best.pt


@dataclass(repr=False, eq=False)
class TuneConfig(Section):
    study_name: str = "pix2seq"
    storage: str = "sqlite:///optuna.db"
    n_trials: int = 20
    timeout_minutes: float = 0.0
    lr_min: float = 1e-4
    lr_max: float = 3e-3
    repeat_min: int = 1
    repeat_max: int = 3
    # tpe: learns from the trials so far (studies of tens of trials); qmc: quasi-random (scrambled
    # Sobol) points spread evenly over the space, so a study of a few trials covers its whole range
    sampler: Literal["tpe", "qmc"] = "tpe"
    sampler_seed: int = 0
    pruner: Literal["median", "hyperband", "none"] = "median"
    # the pruner never stops a trial in this first fraction of its evaluations: AP stays near 0
    # until the classes "click", and a late click is not a bad trial
    pruner_warmup: float = 0.5
    trial_minutes: float = 0.0  # training budget per trial (wall clock); 0: use train.epochs
    trial_epochs: int = 0
    heartbeat_s: int = field(default=60, metadata=RUNTIME)
    output: str = "reports/best_params.json"
    # trials fine-tune from this model file (it becomes their model.init_from: official:NAME, a
    # model.pt or a checkpoint); empty: trials start as the train stage does
    init_from: str = ""
    # the study's report: summary.json (every trial: parameters, AP, state, minutes and steps trained),
    # trials.csv and the plots as PNG
    report_dir: str = "reports/tune"


@dataclass(repr=False, eq=False)
class TrackingConfig(Section):
    """Where and how much MLflow records: runtime keys, DVC does not track them."""

    experiment: str = "pix2seq"
    # registered model; the alias champion-<task> follows the best AP per validation set
    model_name: str = "pix2seq"
    register: bool = True
    log_system_metrics: bool = True
    log_images: int = 16  # validation images in the prediction grid logged at every evaluation


@dataclass(repr=False, eq=False)
class Config(Section):
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig, metadata=RUNTIME)

    def to_dict(self) -> dict[str, Any]:
        with _not_recorded():
            return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"train.lr": 5e-4, ...}``: the whole config as MLflow-style params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, d: dict[str, Any]) -> None:
            for k, v in d.items():
                key = f"{prefix}{k}"
                if isinstance(v, dict):
                    walk(key + ".", v)
                else:
                    out[key] = v

        walk("", self.to_dict())
        return out


def _assign_keys(cls: type, prefix: str = "") -> None:
    keys = {}
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            _assign_keys(tp, f"{prefix}{f.name}.")
        else:
            keys[f.name] = f"{prefix}{f.name}"
    cls._keys = keys


_assign_keys(Config)


def runtime_keys() -> set[str]:
    """The dotted keys marked :data:`RUNTIME` (a section marked so: all its keys)."""
    out: set[str] = set()

    def walk(cls: type, prefix: str, inherited: bool) -> None:
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            runtime = inherited or bool(f.metadata.get("runtime"))
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.", runtime)
            elif runtime:
                out.add(f"{prefix}{f.name}")

    walk(Config, "", False)
    return out


@functools.cache
def known_keys() -> tuple[str, ...]:
    """Every dotted key of the config, in declaration order."""
    return tuple(Config().flat())


# --------------------------------------------------------------------------------------- loading


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; YAML ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and ("off" if not value else "on") in choices:
            value = "on" if value else "off"  # YAML 1.1 reads a bare off/on as a boolean
        if value not in choices:
            raise ConfigError(f"{key}: must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        last: ConfigError | None = None
        for option in typing.get_args(tp):
            try:
                return _coerce(key, value, option)
            except ConfigError as e:
                last = e
        raise last or ConfigError(f"{key}: bad value {value!r}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads "1e-3" as a string; accept it as the number it spells
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp!r}")


def unknown_key_message(key: str) -> str:
    """``train.lrr: unknown key; did you mean train.lr?`` (a near miss in the same section, or the same
    name in another section), else the section's known keys."""
    known = known_keys()
    prefix, _, name = key.rpartition(".")
    siblings = sorted({k[len(prefix) + 1 :].split(".")[0] for k in known if k.startswith(prefix + ".")} if prefix
                      else {k.split(".")[0] for k in known})  # fmt: skip
    close = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
    if close:
        return f"{key}: unknown key; did you mean {f'{prefix}.' if prefix else ''}{close[0]}?"
    elsewhere = [k for k in known if k.rpartition(".")[2] == name]
    if not elsewhere:
        elsewhere = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
    if elsewhere:
        return f"{key}: unknown key; did you mean {elsewhere[0]}?"
    if not siblings:
        return f"{key}: unknown key (sections: {', '.join(sorted({k.split('.')[0] for k in known}))})"
    return f"{key}: unknown key (known: {', '.join(siblings)})"


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in values:
        if k not in names:
            raise ConfigError(unknown_key_message(f"{prefix}.{k}" if prefix else k))
    kwargs = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else k
        kwargs[k] = _coerce(key, v, hints[k])
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {p} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    """``["train.lr=1e-3", "model.backbone=resnet18"]`` -> ``[(key, yaml-parsed value), ...]``."""
    out = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"{item}: an override must look like key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"{item}: empty key")
        out.append((key, _parse_value(key, raw)))
    return out


def _parse_value(key: str, raw: str) -> Any:
    """The YAML value of an override; a YAML error names the key (``train.lr: not valid YAML: ...``)."""
    if raw == "":
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: not valid YAML: {_yaml_problem(e)} in {raw!r}") from None


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: the problem and where (line/column)."""
    problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def check_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    """:func:`parse_overrides`, failing on an unknown key (with a \"did you mean\")."""
    known = known_keys()
    parsed = parse_overrides(overrides)
    for key, _ in parsed:
        if key not in known and not any(k.startswith(key + ".") for k in known):
            raise ConfigError(unknown_key_message(key))
    return parsed


def config_from_dict(values: dict[str, Any], overrides: list[str] | None = None) -> Config:
    if values is not None and not isinstance(values, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {type(values).__name__}")
    try:
        tree = yaml.safe_load(yaml.safe_dump(dict(values or {})))  # deep copy through plain types
    except yaml.YAMLError as e:
        raise ConfigError(f"config: holds a value that is not plain data ({_yaml_problem(e)})") from None
    for key, value in check_overrides(overrides):
        _set_dotted(tree, key, value)
    cfg = _build(Config, tree)
    with _not_recorded():  # checking a value is not using it
        validate(cfg)
    return cfg


def load_config(
    path: str | os.PathLike[str] | None = "params.yaml", overrides: list[str] | None = None
) -> Config:
    """Read ``path`` (YAML), apply ``overrides`` and validate. ``path=None``: defaults only."""
    check_overrides(overrides)  # a bad override is named as such, not as an error in the file
    values: dict[str, Any] = {}
    if path is not None:
        values = _read_yaml_mapping(Path(path))
    try:
        return config_from_dict(values, overrides)
    except ConfigError as e:
        # a key given on the command line is not "in" the file
        given = tuple(o.split("=", 1)[0].strip() for o in overrides or [])
        if not path or str(e).startswith(tuple(f"{k}{c}" for k in given for c in ":[")):
            raise
        raise ConfigError(f"{e} (in {path})") from None


def _read_yaml_mapping(p: Path) -> dict[str, Any]:
    """A params file's top-level mapping; every way the file can be wrong is one line naming it."""
    if not p.exists():
        raise ConfigError(f"{p}: config file not found")
    try:
        raw = read_regular(p, allow_empty=True)
    except FileReadError as e:
        raise ConfigError(f"{e} (expected a YAML config file)") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a YAML text file (byte {e.start} is not UTF-8)") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {_yaml_problem(e)}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(values).__name__}")
    return values


def save_config(cfg: Config, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ------------------------------------------------------------------------------------ validation


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def num_specials() -> int:
    """PAD/EOS, the detection prompt and NOISE (see :mod:`pix2seq.vocab`)."""
    return 3


def validate(cfg: Config) -> None:
    """Impossible values fail here, named by key: first the rules of each key, then the rules that
    hold for every key (:func:`check_every_key`), so a key added later is covered too."""
    d, g, t, m, tr, e, tu = (
        cfg.data,
        cfg.data.generated,
        cfg.tokenizer,
        cfg.model,
        cfg.train,
        cfg.eval,
        cfg.tune,
    )
    _check(d.image_size >= 32, "data.image_size", f"must be >= 32, got {d.image_size}")
    _check(0 < d.scale_min <= d.scale_max, "data.scale_min", "need 0 < scale_min <= scale_max")
    _check(0.0 <= d.hflip <= 1.0, "data.hflip", "must be a probability in [0, 1]")
    _check(
        len(d.detr_scales) > 0 and all(s > 0 for s in d.detr_scales),
        "data.detr_scales",
        "need positive sizes",
    )
    _check(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    _check(
        d.train_split != d.val_split,
        "data.val_split",
        f"must differ from data.train_split ({d.train_split!r})",
    )
    _check(g.image_size >= 32, "data.generated.image_size", "must be >= 32")
    _check(g.num_train >= 1, "data.generated.num_train", "need at least one training image")
    _check(g.num_val >= 1, "data.generated.num_val", "need at least one validation image")
    _check(
        1 <= g.num_classes <= GENERATED_MAX_CLASSES,
        "data.generated.num_classes",
        f"must be in [1, {GENERATED_MAX_CLASSES}] (one shape per class), got {g.num_classes}",
    )
    _check(g.max_objects >= 1, "data.generated.max_objects", "must be >= 1 (images need boxes to train on)")
    _check(
        0 <= g.min_objects <= g.max_objects,
        "data.generated.min_objects",
        "need 0 <= min_objects <= max_objects",
    )
    _check(
        2 <= g.min_object_size <= g.max_object_size < g.image_size,
        "data.generated.max_object_size",
        "need 2 <= min_object_size <= max_object_size < image_size",
    )
    dl = d.download
    _check(
        dl.base_url.startswith(("http://", "https://", "file://")),
        "data.download.base_url",
        f"must be an http://, https:// or file:// URL, got {dl.base_url!r}",
    )
    _check(dl.workers >= 1, "data.download.workers", "must be >= 1")
    _check(dl.max_train_images >= 0, "data.download.max_train_images", "must be >= 0")
    _check(dl.timeout_s > 0, "data.download.timeout_s", f"must be > 0 seconds, got {dl.timeout_s:g}")
    _check(0.0 <= d.prepare.max_bad_fraction <= 1.0, "data.prepare.max_bad_fraction", "must be in [0, 1]")
    _check(
        d.prepare.min_box_size >= 0,
        "data.prepare.min_box_size",
        f"must be >= 0 pixels, got {d.prepare.min_box_size:g}",
    )

    _check(t.bins >= 2, "tokenizer.bins", f"must be >= 2, got {t.bins}")
    _check(t.max_instances >= 1, "tokenizer.max_instances", "must be >= 1")
    _check(0.0 <= t.input_dropout < 1.0, "tokenizer.input_dropout", "must be in [0, 1)")
    for k in (
        "noise_coord_weight",
        "noise_class_weight",
        "class_weight",
        "eos_weight",
        "jitter_std",
        "coord_sigma",
    ):
        _check(getattr(t, k) >= 0, f"tokenizer.{k}", "must be >= 0")
    if t.vocab_size and t.vocab == "compact" and cfg.data.source == "generated":
        need = num_specials() + g.num_classes + t.bins
        _check(
            t.vocab_size >= need,
            "tokenizer.vocab_size",
            f"{t.vocab_size} cannot hold {g.num_classes} categories + {t.bins} bins + "
            f"{num_specials()} special tokens (needs {need})",
        )

    _check(m.d_model > 0, "model.d_model", f"must be positive, got {m.d_model}")
    _check(m.heads > 0, "model.heads", f"must be positive, got {m.heads}")
    _check(
        m.d_model % m.heads == 0, "model.heads", f"d_model {m.d_model} is not divisible by heads {m.heads}"
    )
    _check(m.mlp_dim >= 1, "model.mlp_dim", "must be >= 1")
    _check(m.encoder_layers >= 0, "model.encoder_layers", "must be >= 0")
    _check(m.decoder_layers >= 1, "model.decoder_layers", "must be >= 1")
    _check(m.pos_temperature > 1.0, "model.pos_temperature", f"must be > 1, got {m.pos_temperature}")
    _check(m.ln_eps > 0, "model.ln_eps", f"must be positive, got {m.ln_eps}")
    need = 5 * t.max_instances + 1
    _check(
        m.max_seq_len == 0 or m.max_seq_len >= need,
        "model.max_seq_len",
        f"{m.max_seq_len} positions cannot hold {t.max_instances} objects (needs {need}, or 0)",
    )
    _check(
        not (m.init_from and m.pretrained),
        "model.pretrained",
        "must be false with model.init_from (every weight comes from the init_from file)",
    )
    _check(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)")
    _check(0.0 <= m.drop_path < 1.0, "model.drop_path", "must be in [0, 1)")

    _check(tr.lr > 0, "train.lr", f"must be positive, got {tr.lr}")
    _check(tr.backbone_lr_mult >= 0, "train.backbone_lr_mult", "must be >= 0")
    _check(tr.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    _check(
        len(tr.betas) == 2 and all(0 <= b < 1 for b in tr.betas), "train.betas", "need two values in [0, 1)"
    )
    _check(tr.epochs >= 1, "train.epochs", "must be >= 1")
    _check(tr.max_minutes >= 0, "train.max_minutes", "must be >= 0")
    _check(tr.batch_size >= 1, "train.batch_size", "must be >= 1")
    _check(tr.batch_repeat >= 1, "train.batch_repeat", "must be >= 1")
    _check(tr.accumulate >= 1, "train.accumulate", "must be >= 1")
    _check(tr.warmup_epochs >= 0, "train.warmup_epochs", "must be >= 0")
    _check(0 <= tr.warmup_fraction < 1, "train.warmup_fraction", "must be in [0, 1)")
    _check(0 <= tr.final_lr_fraction <= 1, "train.final_lr_fraction", "must be in [0, 1]")
    _check(tr.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
    _check(tr.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    _check(tr.checkpoint_every_steps >= 1, "train.checkpoint_every_steps", "must be >= 1")
    _check(tr.log_every_steps >= 1, "train.log_every_steps", f"must be >= 1, got {tr.log_every_steps}")
    _check(
        tr.eval_every_epochs >= 0,
        "train.eval_every_epochs",
        "must be >= 0 (0: only on the clock / at the end)",
    )
    _check(tr.eval_every_minutes >= 0, "train.eval_every_minutes", "must be >= 0 (0: off)")

    _check(0 < e.top_p <= 1, "eval.top_p", "must be in (0, 1]")
    _check(e.temperature > 0, "eval.temperature", "must be positive")
    _check(e.beam_size >= 1, "eval.beam_size", "must be >= 1")
    _check(0.0 <= e.coord_window <= 1.0, "eval.coord_window", "must be in [0, 1]")
    _check(e.num_vis >= 0, "eval.num_vis", "must be >= 0")

    _check(0 < tu.lr_min <= tu.lr_max, "tune.lr_min", "need 0 < lr_min <= lr_max")
    _check(1 <= tu.repeat_min <= tu.repeat_max, "tune.repeat_min", "need 1 <= repeat_min <= repeat_max")
    _check(tu.n_trials >= 1, "tune.n_trials", "must be >= 1")
    _check(tu.timeout_minutes >= 0, "tune.timeout_minutes", "must be >= 0 (0: no timeout)")
    _check(tu.trial_minutes >= 0, "tune.trial_minutes", "must be >= 0")
    _check(tu.trial_epochs >= 0, "tune.trial_epochs", "must be >= 0")
    _check(tu.heartbeat_s >= 0, "tune.heartbeat_s", "must be >= 0 (0: no heartbeats)")
    _check(
        "://" in tu.storage,
        "tune.storage",
        f"must be a database URL such as sqlite:///optuna.db or postgresql://user@host/db, got {tu.storage!r}",
    )
    _check(0.0 <= tu.pruner_warmup < 1.0, "tune.pruner_warmup", "must be in [0, 1)")
    _check(cfg.tracking.log_images >= 0, "tracking.log_images", "must be >= 0")
    if d.source == "local":
        for k in ("train_annotations", "train_images", "val_annotations", "val_images"):
            _check(
                bool(getattr(d.local, k).strip()),
                f"data.local.{k}",
                "required with data.source: local (a path, absolute or relative to the repository)",
            )
    check_every_key(cfg)


# Numeric keys that may be negative (none today); every other number must be >= 0.
SIGNED_KEYS: frozenset[str] = frozenset()


def check_every_key(cfg: Config) -> None:
    """The rules every key obeys, whatever its section, including keys added later.

    - numbers are finite (checked on load) and not negative, unless listed in :data:`SIGNED_KEYS`;
    - strings hold no NUL or line break (they are paths, URLs and names);
    - a string or list whose default is not empty may not be empty (empty defaults mean \"unset\").
    """
    defaults = Config().flat()
    for key, value in cfg.flat().items():
        items = value if isinstance(value, list) else [value]
        for i, v in enumerate(items):
            where = f"{key}[{i}]" if isinstance(value, list) else key
            if isinstance(v, int | float) and not isinstance(v, bool) and key not in SIGNED_KEYS:
                _check(v >= 0, where, f"must be >= 0, got {v}")
            if isinstance(v, str):
                _check(
                    not any(c in v for c in "\x00\r\n"),
                    where,
                    f"must not hold a NUL or line break, got {v!r}",
                )
        if isinstance(value, str | list) and not value and defaults.get(key):
            _check(False, key, f"must not be empty (default {defaults[key]!r})")

"""model.init_from: weights loaded before training with a fresh optimizer; files that cannot start
the run are refused naming what differs (tokenizer.*, model.*, tensors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_train_config

from pix2seq.checkpoint import load_checkpoint, save_checkpoint
from pix2seq.config import Config, ConfigError, config_from_dict, load_config
from pix2seq.model import build_model
from pix2seq.vocab import Vocab
from pix2seq.weights import official
from pix2seq.weights.init import InitFromError, load_initial_weights

TINY = {
    "data": {"image_size": 64},
    "tokenizer": {"bins": 32, "max_instances": 3},
    "model": {"backbone": "resnet18", "backbone_stage": "layer3", "backbone_norm": "batch", "d_model": 32,
              "heads": 2, "mlp_dim": 64, "encoder_layers": 1, "decoder_layers": 1},
}  # fmt: skip
CATS = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]


def _cfg(init_from: str = "", **model) -> Config:
    tree = json.loads(json.dumps(TINY))
    tree["model"].update(model, init_from=init_from)
    return config_from_dict(tree)


def _model_file(
    path: Path, cfg: Config, vocab: Vocab, seed: int = 1, training_checkpoint: bool = False
) -> Path:
    torch.manual_seed(seed)
    model, _ = build_model(cfg, vocab)
    state = {
        "model": model.state_dict(),
        "config": cfg.to_dict(),
        "vocab": vocab.to_dict(),
        "categories": CATS[: vocab.num_classes],
    }
    if training_checkpoint:  # what CheckpointManager writes: optimizer and counters too
        opt = torch.optim.AdamW(model.parameters())
        state.update(optimizer=opt.state_dict(), global_step=123, epoch=4)
    return save_checkpoint(path, state)


def _fresh(cfg: Config, vocab: Vocab) -> torch.nn.Module:
    torch.manual_seed(99)
    return build_model(cfg, vocab)[0]


@pytest.mark.parametrize("training_checkpoint", [False, True])
def test_weights_of_a_model_file_or_checkpoint_are_loaded(tmp_path, training_checkpoint):
    vocab = Vocab(2, 32)
    src = _model_file(tmp_path / "m.pt", _cfg(), vocab, training_checkpoint=training_checkpoint)
    cfg = _cfg(str(src), dropout=0.3, drop_path=0.2)  # regularisation may differ
    model = _fresh(cfg, vocab)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary = load_initial_weights(model, cfg, vocab, CATS)
    assert summary.startswith(f"model.init_from: {src}: ") and "tensors loaded" in summary
    stored = load_checkpoint(src)["model"]
    assert all(torch.equal(v, stored[k]) for k, v in model.state_dict().items())
    differed = [k for k in stored if not torch.equal(before[k], stored[k])]
    assert len(differed) >= 30  # every randomly initialised tensor was really overwritten


def test_architecture_mismatch_names_tensors_and_config_keys(tmp_path):
    vocab = Vocab(2, 32)
    src = _model_file(tmp_path / "m.pt", _cfg(), vocab)
    cfg = _cfg(str(src), d_model=64, mlp_dim=128)
    with pytest.raises(InitFromError) as e:
        load_initial_weights(_fresh(cfg, vocab), cfg, vocab, CATS)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(
        f"model.init_from: {src}: its network does not fit this run's: "
    )
    assert "misshaped (" in msg and "(file [32], here [64])" in msg
    assert (
        "the configs differ in model.d_model: file 32, this run 64, model.mlp_dim: file 64, this run 128"
        in msg
    )

    cfg = _cfg(str(src), decoder_layers=2)
    with pytest.raises(
        InitFromError,
        match=r"missing from the file \(decoder\.layers\.1\..*model\.decoder_layers: file 1, this run 2",
    ):
        load_initial_weights(_fresh(cfg, vocab), cfg, vocab, CATS)


def test_vocabulary_mismatch_is_explained_in_config_terms(tmp_path):
    src = _model_file(tmp_path / "m.pt", _cfg(), Vocab(2, 32))
    cfg = _cfg(str(src))
    with pytest.raises(
        InitFromError, match=r"trained on 2 categories and this dataset has 3: with tokenizer.vocab: compact"
    ):
        load_initial_weights(_fresh(cfg, Vocab(3, 32)), cfg, Vocab(3, 32), CATS + [{"id": 3, "name": "x"}])
    cfg64 = config_from_dict(
        {
            **TINY,
            "tokenizer": {"bins": 64, "max_instances": 3},
            "model": {**TINY["model"], "init_from": str(src)},
        }
    )
    with pytest.raises(InitFromError, match=r"trained with tokenizer.bins=32, this run has 64"):
        load_initial_weights(_fresh(cfg64, Vocab(2, 64)), cfg64, Vocab(2, 64), CATS)
    # a converted official checkpoint: the official token layout
    ckpt = load_checkpoint(src)
    ckpt["vocab"] = Vocab.for_categories(CATS, 1000, 0, "official").to_dict()
    save_checkpoint(tmp_path / "official.pt", ckpt)
    cfg = _cfg(str(tmp_path / "official.pt"))
    with pytest.raises(
        InitFromError,
        match=r"uses the official vocabulary \(3000 tokens\) and this run the compact one; set tokenizer.vocab: official",
    ):
        load_initial_weights(_fresh(cfg, Vocab(2, 32)), cfg, Vocab(2, 32), CATS)


def test_missing_and_foreign_files(tmp_path):
    vocab = Vocab(2, 32)
    cfg = _cfg(str(tmp_path / "nope.pt"))
    with pytest.raises(InitFromError, match=r"^model.init_from: .*nope.pt: no such file$"):
        load_initial_weights(_fresh(cfg, vocab), cfg, vocab, CATS)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    cfg = _cfg(str(tmp_path / "other.pt"))
    with pytest.raises(InitFromError, match="not a pix2seq model file or checkpoint"):
        load_initial_weights(_fresh(cfg, vocab), cfg, vocab, CATS)
    cfg = _cfg("official:resnet_9")
    with pytest.raises(
        InitFromError,
        match=r"^model.init_from: official:resnet_9: unknown official model .* known: resnet_640",
    ):
        load_initial_weights(_fresh(cfg, vocab), cfg, vocab, CATS)
    assert isinstance(InitFromError("x"), ConfigError)  # the entry points report it as a config error
    with pytest.raises(ConfigError, match="model.pretrained: must be false with model.init_from"):
        config_from_dict({"model": {"init_from": "x.pt", "pretrained": True}})


def test_official_name_resolves_through_the_cache(tmp_path, monkeypatch):
    """official:NAME with the converted file already cached: loaded without any network."""
    monkeypatch.setenv(official.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(official, "list_objects", lambda *a, **k: pytest.fail("no network expected"))
    vocab = Vocab(2, 32)
    model_pt = tmp_path / "cache" / "resnet_640" / official.MODEL_FILE
    model_pt.parent.mkdir(parents=True)
    _model_file(model_pt, _cfg(), vocab)
    (model_pt.parent / "model.pt.source.json").write_text("{}")
    cfg = _cfg("official:resnet_640")
    model = _fresh(cfg, vocab)
    assert load_initial_weights(model, cfg, vocab, CATS).startswith(
        f"model.init_from: official:resnet_640 ({model_pt}): "
    )
    assert torch.equal(
        model.state_dict()["input_proj.weight"], load_checkpoint(model_pt)["model"]["input_proj.weight"]
    )


def test_training_starts_from_the_file_with_a_fresh_optimizer(
    tiny_prepared, tmp_path, mlflow_store, monkeypatch
):
    import pix2seq.training as training

    root, prepared = tiny_prepared
    over = {"train.epochs": 1}
    base = load_config(None, tiny_train_config(root, prepared, tmp_path / "base", **over))
    vocab = Vocab(3, base.tokenizer.bins)
    src = _model_file(tmp_path / "init.pt", base, vocab, seed=5, training_checkpoint=True)

    seen = {}
    real = training.build_optimizer

    def capture(model, tcfg, device):
        seen["weights"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        opt = real(model, tcfg, device)
        seen["state"] = dict(opt.state)
        return opt

    monkeypatch.setattr(training, "build_optimizer", capture)
    cfg = load_config(
        None, tiny_train_config(root, prepared, tmp_path / "ft", **over, **{"model.init_from": str(src)})
    )
    result = training.run_training(cfg)
    stored = load_checkpoint(src)["model"]
    assert all(torch.equal(seen["weights"][k], stored[k]) for k in stored)
    assert seen["state"] == {}  # fresh optimizer: not the file's AdamW moments
    steps_per_epoch = 24 // cfg.train.batch_size  # tiny_generated: 24 training images, all with boxes
    assert result.global_step == steps_per_epoch  # a new schedule, not the file's step 123
    assert (tmp_path / "ft" / "model.pt").is_file()

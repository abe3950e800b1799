"""`data.source: local`: your COCO files anywhere on disk, linked into data.root (nothing copied),
validated in place by prepare; bad paths fail naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pix2seq.config import ConfigError, PrepareConfig, load_config
from pix2seq.data.download import run_download
from pix2seq.data.local import LocalDataError
from pix2seq.data.prepare import prepare_dataset


def _local(tmp_path: Path, gen: Path, **over: str) -> list[str]:
    keys = {
        "data.source": "local",
        "data.root": str(tmp_path / "data" / "mine"),
        "data.local.train_annotations": str(gen / "annotations" / "instances_train2017.json"),
        "data.local.train_images": str(gen / "train2017"),
        "data.local.val_annotations": str(gen / "annotations" / "instances_val2017.json"),
        "data.local.val_images": str(gen / "val2017"),
        **over,
    }
    return [f"{k}={v}" for k, v in keys.items()]


def test_local_files_are_linked_and_prepared_in_place(tiny_generated, tmp_path):
    gen, _ = tiny_generated
    cfg = load_config(None, _local(tmp_path, Path(gen)))
    summary = run_download(cfg)
    root = Path(cfg.data.root)
    assert summary["source"] == "local" and set(summary["linked"]) == {"train2017", "val2017"}
    for link, target in ((root / "train2017", Path(gen) / "train2017"),
                         (root / "annotations" / "instances_val2017.json",
                          Path(gen) / "annotations" / "instances_val2017.json")):  # fmt: skip
        assert link.is_symlink() and link.resolve() == target.resolve()  # in place: nothing copied
    assert not any(p.is_file() and not p.is_symlink() for p in root.rglob("*") if ".link-tmp" not in p.name)
    report = prepare_dataset(
        root, ["train2017", "val2017"], tmp_path / "prepared", None, PrepareConfig(), progress=False
    )
    assert report["train2017"]["images_kept"] == 24 and report["val2017"]["images_kept"] == 8
    manifest = json.loads((tmp_path / "prepared" / "val2017.json").read_text())
    assert (Path(manifest["root"]) / manifest["images"][0][1]).resolve().parent == (
        Path(gen) / "val2017"
    ).resolve()
    assert run_download(cfg)["source"] == "local"  # idempotent: the links are swapped in again


def test_local_paths_fail_naming_the_key(tiny_generated, tmp_path):
    gen, _ = tiny_generated
    with pytest.raises(ConfigError, match=r"^data.local.val_images: required with data.source: local"):
        load_config(None, _local(tmp_path, Path(gen), **{"data.local.val_images": ""}))
    cfg = load_config(
        None, _local(tmp_path, Path(gen), **{"data.local.train_annotations": str(tmp_path / "x.json")})
    )
    with pytest.raises(LocalDataError, match=r"^data.local.train_annotations: .*x.json: no such file"):
        run_download(cfg)
    cfg = load_config(
        None,
        _local(
            tmp_path,
            Path(gen),
            **{"data.local.val_images": str(gen / "annotations" / "instances_val2017.json")},
        ),
    )
    with pytest.raises(LocalDataError, match=r"^data.local.val_images: .*: no such folder"):
        run_download(cfg)
    real = tmp_path / "real"
    (real / "train2017").mkdir(parents=True)  # data.root holding real files: never replaced
    cfg = load_config(None, _local(tmp_path, Path(gen), **{"data.root": str(real)}))
    with pytest.raises(LocalDataError, match=r"^data.root: .*train2017 is a real folder, not a link"):
        run_download(cfg)
    assert (real / "train2017").is_dir() and not (real / "train2017").is_symlink()

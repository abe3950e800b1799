"""The `pix2seq` command line: `predict` (inputs, outputs, model lookup through paths and MLflow URIs,
COCO results), one-line errors with "did you mean" for every command, `--version`."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_serving import registered_model_info

from pix2seq.cli import main
from pix2seq.cli.predict import collect_images, split_overrides
from pix2seq.inference import ImageReadError, read_image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def registered(tmp_path_factory, tiny_generated) -> dict:
    return registered_model_info(tmp_path_factory, tiny_generated)


@pytest.fixture
def images(registered, tmp_path) -> Path:
    """photos/{a.jpg, b.png, sub/a.jpg, notes.txt, .hidden/x.jpg}: 3 images found in the folder."""
    src = [Path(p) for p in registered["val_images"]]
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    (d / ".hidden").mkdir()
    (d / "a.jpg").write_bytes(src[0].read_bytes())
    Image.open(src[1]).save(d / "b.png")
    (d / "sub" / "a.jpg").write_bytes(src[2].read_bytes())
    (d / "notes.txt").write_text("not an image")
    (d / ".hidden" / "x.jpg").write_bytes(src[3].read_bytes())
    return d


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _report(out: Path) -> dict:
    return json.loads((out / "detections.json").read_text())


def _check_entry(e: dict, out: Path, cats: dict[int, str], score_threshold: float) -> None:
    n = len(e["boxes"])
    assert len(e["scores"]) == len(e["labels"]) == len(e["category_ids"]) == len(e["names"]) == n
    assert all(len(b) == 4 and b[0] <= b[2] and b[1] <= b[3] for b in e["boxes"])
    assert all(s >= score_threshold for s in e["scores"])
    assert all(cats[c] == name for c, name in zip(e["category_ids"], e["names"], strict=True))
    png = out / e["visualization"]
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (e["width"], e["height"])


# ------------------------------------------------------------------------------ pure helpers


def test_split_overrides_and_collect_images(images, tmp_path):
    inputs, overrides = split_overrides([str(images), "eval.decoding=beam", "x=1", "eval.beam_size=2"])
    assert inputs == [str(images), "x=1"] and overrides == ["eval.decoding=beam", "eval.beam_size=2"]

    extra = tmp_path / "a.jpg"  # same stem as photos/a.jpg: its overlay name must not collide
    extra.write_bytes((images / "a.jpg").read_bytes())
    got = collect_images([str(images), str(images / "a.jpg"), str(extra), str(tmp_path / "nope.jpg")])
    assert [j.path.relative_to(tmp_path).as_posix() for j in got.jobs] == [
        "photos/a.jpg", "photos/b.png", "photos/sub/a.jpg", "a.jpg",
    ]  # fmt: skip
    names = [j.out_name for j in got.jobs]
    assert names == ["a.png", "b.png", "sub/a.png", "a-2.png"]
    assert got.missing == [(str(tmp_path / "nope.jpg"), "no such file or directory")]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no jpg/jpeg/png images" in collect_images([str(empty)]).missing[0][1]


def _encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def test_read_image_formats(tmp_path):
    rgb = (np.arange(10 * 12 * 3) % 251).astype(np.uint8).reshape(10, 12, 3)
    for fmt in ("PNG", "JPEG", "BMP", "WEBP"):
        img = read_image(_encode(rgb, fmt))
        assert img.dtype == torch.uint8 and img.shape == (3, 10, 12), fmt
    sixteen = read_image(_encode((np.arange(120).reshape(10, 12) * 500).astype(np.uint16), "PNG"))
    assert sixteen.dtype == torch.uint8 and sixteen.shape == (3, 10, 12) and int(sixteen.max()) > 200
    frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert read_image(buf.getvalue()).shape == (3, 10, 12)  # first frame of an animated GIF
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated = read_image(_encode(rgb, "JPEG", exif=exif.tobytes()))
    assert rotated.shape == (3, 12, 10)  # boxes refer to the image as viewers show it
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ImageReadError, match=r"bad\.jpg: cannot decode image"):
        read_image(tmp_path / "bad.jpg")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"empty\.png: empty file"):
        read_image(tmp_path / "empty.png")
    with pytest.raises(ImageReadError, match="missing.png: no such file"):
        read_image(tmp_path / "missing.png")


def test_predictor_never_downloads_backbone_weights(registered, tmp_path, monkeypatch):
    """A model trained from ImageNet weights loads offline: the checkpoint holds every weight."""
    import torchvision

    from pix2seq.checkpoint import load_checkpoint, save_checkpoint
    from pix2seq.inference import Predictor

    ckpt = load_checkpoint(registered["model_pt"])
    ckpt["config"]["model"]["pretrained"] = True
    save_checkpoint(tmp_path / "pretrained.pt", ckpt)

    def no_download(*a, **k):
        raise AssertionError("tried to fetch ImageNet weights")

    monkeypatch.setattr(torchvision.models, "get_model_weights", no_download)
    p = Predictor(tmp_path / "pretrained.pt", device="cpu")
    assert p.cfg.model.pretrained is True
    assert len(p.predict([read_image(registered["val_images"][0])])) == 1


# ------------------------------------------------------------------------------------- predict


def test_predict_checkpoint_on_folder(registered, images, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = _run(
        ["predict", str(images), "--model", registered["model_pt"], "--out", str(out), "--device", "cpu",
         "--batch-size", "2", "--score-threshold", "0"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "3 image(s)" in stdout
    rep = _report(out)
    assert [Path(e["file"]).relative_to(images).as_posix() for e in rep["images"]] == [
        "a.jpg",
        "b.png",
        "sub/a.jpg",
    ]
    assert rep["errors"] == [] and rep["score_threshold"] == 0.0
    cats = {int(c["id"]): c["name"] for c in registered["categories"]}
    for e in rep["images"]:
        _check_entry(e, out, cats, 0.0)
    assert sum(len(e["boxes"]) for e in rep["images"]) > 0
    # the same image as JPEG and as PNG: same detections (up to JPEG round-off, not asserted)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        "a.png",
        "b.png",
        "sub/a.png",
    ]


def test_predict_registered_model_uris_with_overrides(registered, images, tmp_path, capsys, monkeypatch):
    """models:/name@champion, runs:/<id>/model and runs:/<id>/checkpoints/best.pt all resolve."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cats = {int(c["id"]): c["name"] for c in registered["categories"]}
    run_id = registered["run_id"]
    img = str(images / "a.jpg")
    results = {}
    for uri in ("models:/pix2seq@champion", f"runs:/{run_id}/model", f"runs:/{run_id}/checkpoints/best.pt"):
        out = tmp_path / uri.replace(":", "").replace("/", "_")
        code, stdout, err = _run(
            ["predict", img, "--model", uri, "--tracking-uri", registered["uri"], "--out", str(out),
             "--device", "cpu", "--score-threshold", "0.0", "eval.decoding=beam", "eval.beam_size=2"],
            capsys,
        )  # fmt: skip
        assert code == 0, f"{uri}: {err}"
        if uri.endswith("@champion"):  # it says which task's champion it used
            assert "(champion of task " in stdout and "@champion-" in stdout, stdout
        rep = _report(out)
        assert rep["overrides"] == ["eval.decoding=beam", "eval.beam_size=2"]
        (entry,) = rep["images"]
        _check_entry(entry, out, cats, 0.0)
        results[uri] = entry["boxes"]
    # the registered model's checkpoint is the best checkpoint, exported
    assert len(set(json.dumps(v) for v in results.values())) == 1
    # resolved against --tracking-uri only: no default store appeared, MLflow's globals are restored
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_predict_unreadable_images_reported_and_rest_written(registered, images, tmp_path, capsys):
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (images / "sub" / "empty.png").write_bytes(b"")
    out = tmp_path / "out"
    code, _, err = _run(
        ["predict", str(images), str(tmp_path / "missing.png"), "--model", registered["model_pt"],
         "--out", str(out), "--device", "cpu"],
        capsys,
    )  # fmt: skip
    assert code == 2
    lines = err.strip().splitlines()
    assert any("broken.jpg: cannot decode image" in ln for ln in lines), err
    assert any("empty.png: empty file" in ln for ln in lines), err
    assert any("missing.png: no such file or directory" in ln for ln in lines), err
    assert "3 input(s) could not be read" in lines[-1]
    rep = _report(out)
    assert len(rep["images"]) == 3  # every readable image processed and written
    assert sorted(Path(e["file"]).name for e in rep["errors"]) == ["broken.jpg", "empty.png", "missing.png"]
    cats = {int(c["id"]): c["name"] for c in registered["categories"]}
    for e in rep["images"]:
        _check_entry(e, out, cats, 0.3)  # the default threshold


def _one_line_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("pix2seq predict: error: "), err
    return lines[0]


def test_predict_errors_are_one_line_and_exit_2(registered, images, tmp_path, capsys):
    img = str(images / "a.jpg")
    out = str(tmp_path / "out")

    code, _, err = _run(["predict", img, "--model", str(tmp_path / "nope.pt"), "--out", out], capsys)
    assert code == 2 and "nope.pt: no such file or directory" in _one_line_error(err)

    code, _, err = _run(["predict", img, "--model", "models:/no-such-model@champion", "--tracking-uri",
                         registered["uri"], "--out", out], capsys)  # fmt: skip
    line = _one_line_error(err)
    assert code == 2 and "models:/no-such-model@champion" in line and "not found" in line.lower()

    code, _, err = _run(["predict", img, "--model", "models:/pix2seq@champion", "--tracking-uri",
                         f"sqlite:///{tmp_path / 'absent.db'}", "--out", out], capsys)  # fmt: skip
    assert code == 2 and "no MLflow store at" in _one_line_error(err)
    assert not (tmp_path / "absent.db").exists()  # a lookup never creates a store

    if not torch.cuda.is_available():
        code, _, err = _run(["predict", img, "--model", registered["model_pt"], "--device", "cuda", "--out", out],
                            capsys)  # fmt: skip
        line = _one_line_error(err)
        assert code == 2 and "--device cuda" in line and "CUDA is not available" in line

    code, _, err = _run(
        ["predict", img, "--model", registered["model_pt"], "eval.decodng=beam", "--out", out], capsys
    )
    assert code == 2 and "eval.decodng" in _one_line_error(err)

    code, _, err = _run(["predict", str(tmp_path / "none.jpg"), "--model", registered["model_pt"], "--out", out],
                        capsys)  # fmt: skip
    assert code == 2 and "none.jpg: no such file or directory" in err and "no images to process" in err

    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    code, _, err = _run(["predict", img, "--model", str(bogus), "--out", out], capsys)
    assert code == 2 and "bogus.pt" in _one_line_error(err)
    assert not (tmp_path / "out" / "detections.json").exists()

    with pytest.raises(SystemExit) as exc:  # argparse: usage errors exit 2 as well
        main(["predict", img, "--device", "tpu"])
    assert exc.value.code == 2
    capsys.readouterr()


@pytest.mark.slow
def test_console_script_exit_status(registered, images, tmp_path):
    """The installed `pix2seq` entry point: exit 2 with unreadable images, the rest still written."""
    exe = Path(sys.executable).parent / "pix2seq"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "pix2seq.cli"]
    (images / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "out"
    r = subprocess.run(
        [*cmd, "predict", str(images / "a.jpg"), str(images / "bad.png"), "--model", registered["model_pt"],
         "--out", str(out), "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env={**_env(), "MLFLOW_TRACKING_URI": registered["uri"]},
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "bad.png: cannot decode image" in r.stderr
    assert "Traceback" not in r.stderr
    rep = _report(out)
    assert [Path(e["file"]).name for e in rep["images"]] == ["a.jpg"] and (out / "a.png").is_file()


def _env() -> dict[str, str]:
    return {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
def test_make_predict_target_passes_arguments():
    r = subprocess.run(
        ["make", "-n", "--no-print-directory", "predict", "IMAGES=a.jpg data/b.jpg", "MODEL=runs/x/model.pt",
         "DEVICE=cpu", "SCORE=0.5", "eval.decoding=beam"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    cmd = " ".join(ln for ln in r.stdout.replace("\\\n", " ").splitlines() if "bin/pix2seq predict" in ln)
    assert 'predict a.jpg data/b.jpg --model "runs/x/model.pt"' in cmd
    assert (
        "--device cpu" in cmd
        and "--score-threshold 0.5" in cmd
        and cmd.rstrip().endswith("eval.decoding=beam")
    )
    assert cmd.count("data/b.jpg") == 1


def test_weights_convert_without_tensorflow_names_the_extra(tmp_path, capsys, monkeypatch):
    """`pix2seq weights convert` without the `official` extra: one line saying what to install."""
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # `import tensorflow` raises ImportError
    args = ["weights", "convert", str(tmp_path / "ckpt"), "--arch", "resnet", "--image-size", "64"]
    assert main([*args, "--out", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pix2seq weights convert: error:") and "\n" not in err
    assert "'official' extra: uv sync --extra official" in err and not (tmp_path / "m.pt").exists()


def test_predict_coco_results_format(registered, images, tmp_path, capsys):
    """`--format coco`: a COCO results list; the image id is the file name's number, else its position."""
    coco_named = images / "000000000042.jpg"
    coco_named.write_bytes((images / "a.jpg").read_bytes())
    out = tmp_path / "coco"
    code, _, err = _run(
        ["predict", str(images / "b.png"), str(coco_named), "--model", registered["model_pt"], "--out", str(out),
         "--device", "cpu", "--score-threshold", "0", "--format", "coco"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    results = json.loads((out / "detections.json").read_text())
    assert isinstance(results, list) and results
    assert {r["image_id"] for r in results} == {1, 42}
    cats = {int(c["id"]) for c in registered["categories"]}
    for r in results:
        assert set(r) == {"image_id", "category_id", "bbox", "score"} and r["category_id"] in cats
        x, y, w, h = r["bbox"]
        assert w >= 0 and h >= 0 and 0.0 <= r["score"] <= 1.0
    from pix2seq.evaluation.coco import coco_evaluate

    gt = json.loads((Path(registered["root"]) / "annotations" / "instances_val2017.json").read_text())
    coco_evaluate(gt, [r for r in results if r["image_id"] in {im["id"] for im in gt["images"]}])  # loadable


def test_version_and_one_line_config_errors(tmp_path, capsys, monkeypatch):
    """Every command: a misspelled key is one line with a "did you mean", exit 2, no traceback."""
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("pix2seq ")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("train:\n  lr: 0.001\n")
    for argv, expect in (
        (["train", "train.lrr=1e-3"], "pix2seq train: error: train.lrr: unknown key; did you mean train.lr?"),
        (
            ["eval", "eval.num_viss=4"],
            "pix2seq eval: error: eval.num_viss: unknown key; did you mean eval.num_vis?",
        ),
        (
            ["tune", "train.num_vis=4"],
            "pix2seq tune: error: train.num_vis: unknown key; did you mean eval.num_vis?",
        ),
        (["prepare", "--params", "nope.yaml"], "pix2seq prepare: error: nope.yaml: config file not found"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [expect], err
    (tmp_path / "params.yaml").write_text("trian:\n  lr: 0.001\n")
    assert main(["download"]) == 2
    assert "trian: unknown key; did you mean train?" in capsys.readouterr().err

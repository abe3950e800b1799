"""Issue 15's bad-input matrix, one test per row: bad data and bad config never cost a run.

Every row runs the real entry point (``pix2seq <command>``'s ``main()``, what DVC and make run, in process;
one test starts real processes) and asserts the exit status, the one-line message naming the key
or file, and that the previous good run's manifests and checkpoints are still there.

  1  a malformed validation entry: training evaluates on the prepared manifest, AP as without it;
     an evaluation that fails loses no training (checkpoint first, resume evaluates first)
  2  an empty training split: prepare fails (and leaves no stale manifest), training refuses
  3  config values that cannot work (test_config.py walks every key; here through the stages)
  4  one line instead of a traceback: bad YAML overrides in every stage and in predict, binary or
     directory params files, a crafted checkpoint, an unreadable last.pt at resume
  5  duplicate annotation and image ids (test_prepare.py)
  6  messages in the user's terms: not a checkpoint, not readable, empty file
  7  predict refuses a FIFO (and devices, directories) without reading it
  8  extraction merges and refuses colliding archives (test_download.py)
  9  images over tokenizer.max_instances reported (test_prepare.py); a failed prepare leaves no
     stale manifest (row 2)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_train_config
from pipeline_deps import COMMANDS

from pix2seq.checkpoint import CheckpointManager, load_checkpoint, save_checkpoint
from pix2seq.config import PrepareConfig
from pix2seq.data.ground_truth import coco_ground_truth
from pix2seq.data.prepare import prepare_dataset
from pix2seq.errors import Pix2SeqError, run_entry_point
from pix2seq.evaluation.coco import coco_evaluate

REPO = Path(__file__).resolve().parents[1]
STAGES = tuple(COMMANDS)

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities:DeprecationWarning"
)


class _Stage:
    """The DVC stage ``name`` as ``pix2seq <command>`` runs it (``bin/pix2seq`` in dvc.yaml)."""

    def __init__(self, name: str) -> None:
        self.command = COMMANDS[name]

    def main(self, argv: list[str]) -> int:
        from pix2seq.cli import main

        return main([self.command, *argv])


def _stage(name: str) -> _Stage:
    return _Stage(name)


def _prog(stage: str) -> str:
    """What a stage's one-line errors start with (``pix2seq eval`` for the evaluate stage)."""
    return f"pix2seq {COMMANDS[stage]}"


def _one_error(err: str, prog: str) -> str:
    """The single ``<prog>: error: ...`` line of ``err``; no traceback anywhere."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"{prog}: error: ")]
    assert len(lines) == 1, err
    return lines[0].removeprefix(f"{prog}: error: ")


def _dataset_copy(root: Path, dest: Path, keep: str) -> Path:
    """``dest``: ``root``'s images (linked) and its ``keep`` split's annotation file; the caller
    writes the other one."""
    (dest / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        (dest / split).symlink_to(root / split)
    shutil.copy(root / "annotations" / f"instances_{keep}.json", dest / "annotations")
    return dest


def _snapshot(*dirs: Path) -> dict[str, bytes]:
    """Every file below ``dirs`` with its bytes: what a failed run must leave as it was."""
    return {str(p): p.read_bytes() for d in dirs for p in sorted(Path(d).rglob("*")) if p.is_file()}


@pytest.fixture
def good_run(tiny_prepared, tmp_path, monkeypatch):
    """A working directory holding a previous good run: params.yaml, manifests and checkpoints."""
    root, prepared = tiny_prepared
    monkeypatch.chdir(tmp_path)
    shutil.copytree(prepared, tmp_path / "prepared")
    ckpts = CheckpointManager(tmp_path / "runs" / "checkpoints")
    ckpts.save({"global_step": 7, "w": torch.ones(2)}, step=7, is_best=True)
    params = {
        "data": {"root": str(root), "prepared_dir": "prepared"},
        "train": {"output_dir": "runs"},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    before = _snapshot(tmp_path / "prepared", tmp_path / "runs")
    yield tmp_path
    assert _snapshot(tmp_path / "prepared", tmp_path / "runs") == before, (
        "a failed run changed the last good one"
    )


# ----------------------------------------------------------------------- row 1: evaluation data


@pytest.fixture(scope="module")
def val_sets(tiny_generated, tiny_prepared, tmp_path_factory):
    """The tiny dataset's manifests as generated (``clean``) and with a validation file full of
    entries prepare drops (``dirty``): no bbox, no category, 3 numbers, not an object, NaN,
    negative size, under a pixel, outside the image, an exact duplicate, an image without id."""
    root, clean = tiny_prepared
    base = tmp_path_factory.mktemp("valsets")
    dirty_root = _dataset_copy(root, base / "dirty", keep="train2017")
    coco = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    n = max(a["id"] for a in coco["annotations"]) + 1
    im = coco["images"][0]["id"]
    coco["annotations"] += [
        {"id": n, "image_id": im, "category_id": 1},
        {"id": n + 1, "image_id": im, "bbox": [1, 1, 9, 9]},
        {"id": n + 2, "image_id": im, "category_id": 1, "bbox": [1, 1, 9]},
        "not an object",
        {"id": n + 3, "image_id": im, "category_id": 1, "bbox": [float("nan"), 1, 9, 9]},
        {"id": n + 4, "image_id": im, "category_id": 1, "bbox": [20, 20, -9, 9]},
        {"id": n + 5, "image_id": im, "category_id": 1, "bbox": [3, 3, 0.5, 0.5]},
        {"id": n + 6, "image_id": im, "category_id": 1, "bbox": [500, 500, 9, 9]},
        dict(coco["annotations"][0]),
    ]
    coco["images"].append({"file_name": coco["images"][0]["file_name"], "width": 64, "height": 64})
    (dirty_root / "annotations" / "instances_val2017.json").write_text(json.dumps(coco))
    dirty = base / "prepared"
    report = prepare_dataset(  # min_box_size 1: the entry under a pixel goes too (default 0 keeps it)
        dirty_root, ["train2017", "val2017"], dirty, base / "report.json",
        PrepareConfig(max_bad_fraction=0.2, min_box_size=1.0), progress=False,
    )  # fmt: skip
    assert report["val2017"]["boxes_dropped"] == 9 and report["val2017"]["images_bad"] == 1
    return root, clean, dirty


def test_ground_truth_comes_from_the_manifest(val_sets):
    """What prepare drops is not ground truth: the dirty set's GT is the clean set's, and a perfect
    detector scores 100 AP on it (on the raw file it crashed, or scored 94.5 with bad boxes kept)."""
    _, clean, dirty = val_sets
    raw = dirty.parent / "dirty" / "annotations" / "instances_val2017.json"
    gt_clean = coco_ground_truth(clean / "val2017.json")
    gt_dirty = coco_ground_truth(dirty / "val2017.json")
    assert gt_dirty["annotations"] == gt_clean["annotations"] and gt_dirty["images"] == gt_clean["images"]
    perfect = [{**a, "score": 1.0} for a in gt_dirty["annotations"]]
    for backend in ("faster_coco_eval", "pycocotools"):
        assert coco_evaluate(gt_dirty, perfect, backend=backend).metrics["AP"] == pytest.approx(100.0)
    # an imperfect detector (boxes shifted by 0-3 px) scores the same in between on both
    shifted = [
        {**a, "bbox": [a["bbox"][0] + i % 4, a["bbox"][1], *a["bbox"][2:]], "score": 1.0 - i / 100}
        for i, a in enumerate(gt_dirty["annotations"])
    ]
    ap_dirty = coco_evaluate(gt_dirty, shifted).metrics
    assert 10 < ap_dirty["AP"] < 90 and ap_dirty == coco_evaluate(gt_clean, shifted).metrics
    with pytest.raises(KeyError):  # what evaluating on the raw file did (at training's first evaluation)
        coco_evaluate(raw, perfect)


@pytest.fixture(scope="module")
def dirty_val_run(val_sets, tmp_path_factory):
    """A tiny training evaluated (every epoch) on the dirty validation manifest."""
    root, clean, dirty = val_sets
    tmp = tmp_path_factory.mktemp("dirty_run")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    try:
        from pix2seq.config import load_config
        from pix2seq.training import run_training

        over = tiny_train_config(root, dirty, tmp / "run", **{"train.eval_every_epochs": 1})
        result = run_training(load_config(None, over))
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        import mlflow

        mlflow.set_tracking_uri(None)
    return result, tmp, over


def test_malformed_validation_entries_train_evaluate_and_score_like_the_clean_set(
    dirty_val_run, val_sets, tmp_path, monkeypatch, capsys
):
    root, clean, dirty = val_sets
    result, tmp, over = dirty_val_run
    assert result.global_step == 12 and (tmp / "run" / "checkpoints" / "last.pt").is_file()
    summary = json.loads((tmp / "run" / "train_summary.json").read_text())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n")
    scores = {}
    for name, prepared in (("clean", clean), ("dirty", dirty)):
        out = tmp_path / name
        code = _stage("evaluate").main(
            [*over, f"data.prepared_dir={prepared}", f"eval.checkpoint={tmp / 'run' / 'checkpoints' / 'last.pt'}",
             f"eval.output_dir={out}"]
        )  # fmt: skip
        assert code == 0, capsys.readouterr().err
        scores[name] = json.loads((out / "metrics.json").read_text())
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
    assert [scores["dirty"][k] for k in keys] == [scores["clean"][k] for k in keys]
    assert scores["dirty"]["AP"] == pytest.approx(summary["final_AP"])  # what training reported
    assert scores["dirty"]["AR100"] >= 0  # scored, not undefined


def test_a_failed_evaluation_loses_no_training(tiny_prepared, tmp_path, monkeypatch, capsys):
    """Rows 1 and 4: the checkpoint is written before evaluating; an unreadable last.pt at resume is
    one line pointing at train.resume=never; the next run resumes and evaluates first."""
    import pix2seq.training as training

    root, prepared = tiny_prepared
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n")
    over = tiny_train_config(root, prepared, tmp_path / "run", **{"train.eval_every_epochs": 1})
    ckpts = tmp_path / "run" / "checkpoints"
    real_evaluate = training.evaluate_model

    def broken(*a, **k):
        raise RuntimeError("evaluation crashed")

    monkeypatch.setattr(training, "evaluate_model", broken)
    with pytest.raises(RuntimeError, match="evaluation crashed"):  # a bug keeps its traceback
        _stage("train").main(over)
    saved = load_checkpoint(ckpts / "last.pt")
    assert saved["global_step"] == 6 and saved["eval_pending"] and saved["epoch"] == 1

    # an unreadable last.pt (and step file): one line, nothing moved or deleted
    import pix2seq.files as files

    real_open = files.os.open

    def denied(path, *a, **k):
        if str(path).endswith(".pt"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(training, "evaluate_model", real_evaluate)
    monkeypatch.setattr(files.os, "open", denied)
    before = _snapshot(ckpts)
    assert _stage("train").main(over) == 2
    msg = _one_error(capsys.readouterr().err, _prog("train"))
    assert msg.startswith(
        f"no readable checkpoint to resume from in {ckpts}: {ckpts / 'last.pt'}: not readable (permission denied)"
    )
    assert "set train.resume=never to start a new run" in msg
    assert _snapshot(ckpts) == before
    monkeypatch.setattr(files.os, "open", real_open)

    assert _stage("train").main(over) == 0
    out = capsys.readouterr().out
    assert f"resumed from {ckpts / 'last.pt'}: epoch 1, batch 0, step 6" in out
    final = load_checkpoint(ckpts / "last.pt")
    assert final["global_step"] == 12 and not final["eval_pending"]
    assert [s for s, _ in final["history"]["AP"]] == [6, 12]  # the pending evaluation ran first
    assert (ckpts / "best.pt").is_file() and (tmp_path / "run" / "model.pt").is_file()


# ------------------------------------------------------------------------ row 2: empty splits


def test_an_empty_training_split_fails_prepare_and_training(tiny_generated, good_run, capsys):
    root, _ = tiny_generated
    empty = _dataset_copy(root, good_run / "empty", keep="val2017")
    coco = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    stale = good_run / "stale"
    shutil.copytree(good_run / "prepared", stale)

    for what, change, message in [
        ("annotations", {"annotations": []}, "train2017: no boxes to train or evaluate on (0 annotations)"),
        ("images", {"images": [], "annotations": []}, "train2017: no usable images (0 entries, 0 bad)"),
    ]:
        (empty / "annotations" / "instances_train2017.json").write_text(json.dumps({**coco, **change}))
        assert _stage("prepare").main([f"data.root={empty}", f"data.prepared_dir={stale}"]) == 2, what
        msg = _one_error(capsys.readouterr().err, _prog("prepare"))
        assert message in msg and "no manifest written" in msg
        assert not list(stale.glob("*2017.json")), "a failed prepare must not leave stale manifests"
        assert json.loads((good_run / "reports" / "prepare.json").read_text())["train2017"]["boxes_kept"] == 0

    # a manifest without images (written by hand, or by an older prepare): training refuses it
    manifest = json.loads((good_run / "prepared" / "train2017.json").read_text())
    shutil.copytree(good_run / "prepared", good_run / "hand")
    (good_run / "hand" / "train2017.json").write_text(
        json.dumps({**manifest, "images": [], "boxes": [], "labels": []})
    )
    assert _stage("train").main([f"data.prepared_dir={good_run / 'hand'}", "train.output_dir=runs2"]) == 2
    msg = _one_error(capsys.readouterr().err, _prog("train"))
    assert msg == (
        f"{good_run / 'hand' / 'train2017.json'}: the training split 'train2017' has 0 images and 0 boxes; "
        "nothing to train on"
    )
    assert not (good_run / "runs2" / "checkpoints").exists()


# ------------------------------------------------------------- rows 3 and 4: config, YAML, files


def test_config_rows_fail_every_stage_with_one_line(good_run, capsys):
    rows = [
        ("train", "train.log_every_steps=0", "train.log_every_steps: must be >= 1, got 0"),
        ("prepare", "data.prepare.min_box_size=-1", "data.prepare.min_box_size: must be >= 0 pixels, got -1"),
        (
            "prepare",
            "data.prepare.min_box_size=.nan",
            "data.prepare.min_box_size: must be a finite number, got nan",
        ),
        ("download", "data.download.timeout_s=0", "data.download.timeout_s: must be > 0 seconds, got 0"),
        ("train", "train.lr=.inf", "train.lr: must be a finite number, got inf"),
        ("evaluate", "train.output_dir=", "train.output_dir: must not be empty (default 'runs/train')"),
        ("download", "data.generated.num_classes=11", "data.generated.num_classes: must be in [1, 10]"),
        ("tune", "tune.heartbeat_s=-5", "tune.heartbeat_s: must be >= 0"),
    ]
    for stage, override, message in rows:
        assert _stage(stage).main([override]) == 2, override
        assert _one_error(capsys.readouterr().err, _prog(stage)).startswith(message)


def test_bad_yaml_and_params_files_in_every_entry_point(good_run, capsys):
    from pix2seq.cli import main as pix2seq_main

    for stage in STAGES:
        for override, message in [
            ("train.lr=[1", "train.lr: not valid YAML: expected ',' or ']', but got '<stream end>'"),
            ("x=a: b: c", "x: not valid YAML: mapping values are not allowed here"),
        ]:
            assert _stage(stage).main([override]) == 2, (stage, override)
            assert _one_error(capsys.readouterr().err, _prog(stage)).startswith(message)
    assert pix2seq_main(["predict", "a.jpg", "train.lr=[1"]) == 2
    assert _one_error(capsys.readouterr().err, "pix2seq predict").startswith(
        "override train.lr: not valid YAML"
    )

    binary = good_run / "params.bin"
    binary.write_bytes(os.urandom(64) + b"\xff")
    for stage in STAGES:
        for params, message in [
            (binary, f"{binary}: not a YAML text file (byte "),
            (good_run, f"{good_run}: is a directory, not a regular file; refused (not read)"),
        ]:
            assert _stage(stage).main(["--params", str(params)]) == 2, (stage, params)
            assert _one_error(capsys.readouterr().err, _prog(stage)).startswith(message)


def _crafted(path: Path, **entries) -> Path:
    state = {"model": {}, "config": {}, "vocab": {"num_classes": 3, "bins": 32}, "categories": [], **entries}
    return save_checkpoint(path, state)


def test_crafted_and_damaged_checkpoints_are_one_line(good_run, capsys):
    """Rows 4 and 6: a checkpoint whose config is not a mapping, random bytes, an empty file, an
    unreadable file: predict and evaluate say what is wrong with which file."""
    from pix2seq.cli import main as pix2seq_main

    img = good_run / "img.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(img)
    crafted = _crafted(good_run / "crafted.pt", config="x")
    random = good_run / "random.pt"
    random.write_bytes(os.urandom(4096))
    empty = good_run / "empty.pt"
    empty.write_bytes(b"")
    trunc = good_run / "trunc.pt"
    trunc.write_bytes(crafted.read_bytes()[:300])
    unknown = _crafted(good_run / "unknown.pt", config={"train": {"nope": 1}})
    rows = [
        (crafted, "not a pix2seq checkpoint (entry 'config' is a str, expected a mapping)"),
        (random, "not a checkpoint (not a file torch.save writes; 4096 bytes)"),
        (empty, "empty file (0 bytes), not a checkpoint"),
        (trunc, "corrupt or truncated checkpoint (300 bytes); write it again or use an earlier one"),
        (unknown, "its stored config does not load here (train.nope: unknown key"),
        (
            good_run / "prepared",
            "is a directory, not a regular file; refused (not read) (expected a checkpoint)",
        ),
    ]
    for path, message in rows:
        if path.is_file():  # predict looks for a model inside a directory
            assert (
                pix2seq_main(["predict", str(img), "--model", str(path), "--out", "pred", "--device", "cpu"])
                == 2
            )
            assert _one_error(capsys.readouterr().err, "pix2seq predict").startswith(f"{path}: {message}")
        assert _stage("evaluate").main([f"eval.checkpoint={path}"]) == 2
        msg = _one_error(capsys.readouterr().err, _prog("evaluate"))
        assert msg.startswith(f"{path}: {message}") and "weights_only" not in msg


def test_permission_denied_is_said_so(tmp_path, monkeypatch):
    """Row 6 (as root, chmod does not stop reads: the denial is simulated at os.open)."""
    import pix2seq.files as files
    from pix2seq.checkpoint import CheckpointError
    from pix2seq.inference import ImageReadError, read_image

    ckpt = _crafted(tmp_path / "c.pt")
    img = tmp_path / "a.jpg"
    img.write_bytes(b"\xff\xd8\xff")
    real_open = files.os.open

    def denied(path, *a, **k):
        if str(path).startswith(str(tmp_path)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(files.os, "open", denied)
    with pytest.raises(CheckpointError, match=r"c.pt: not readable \(permission denied\)"):
        load_checkpoint(ckpt)
    with pytest.raises(ImageReadError, match=r"a.jpg: not readable \(permission denied\)"):
        read_image(img)
    from pix2seq.data.prepare import check_image

    assert check_image(img, 1, 1, decode=True) == ("unreadable", f"{img}: not readable (permission denied)")
    monkeypatch.setattr(files.os, "open", real_open)
    img.write_bytes(b"")
    assert check_image(img, 1, 1, decode=True) == ("corrupt", f"{img}: empty file (0 bytes)")
    assert check_image(img, 1, 1, decode=False) == ("corrupt", f"{img}: empty file (0 bytes)")


# ------------------------------------------------------------------------------- row 7: FIFOs


def test_predict_refuses_a_fifo_without_reading_it(tmp_path, capsys):
    from pix2seq.cli import main as pix2seq_main
    from pix2seq.files import FileReadError, read_regular

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    result: dict = {}
    t = threading.Thread(
        target=lambda: result.update(code=pix2seq_main(["predict", str(fifo), "--model", "m.pt"])),
        daemon=True,
    )
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "predict blocked reading a FIFO"
    err = capsys.readouterr().err
    assert result["code"] == 2 and "Traceback" not in err
    assert f"{fifo}: is a FIFO (named pipe), not a regular file; refused (not read)" in err
    for special, kind in (
        (fifo, "a FIFO (named pipe)"),
        (Path("/dev/zero"), "a device"),
        (tmp_path, "a directory"),
    ):
        with pytest.raises(FileReadError, match=re.escape(f"is {kind}, not a regular file")):
            read_regular(special)


# ------------------------------------------------------------------- the entry-point contract


def test_run_entry_point_contract(capsys, monkeypatch, tmp_path):
    def fail(exc):
        def fn():
            raise exc

        return fn

    assert run_entry_point("prog", lambda: None) == 0 and run_entry_point("prog", lambda: 3) == 3
    assert run_entry_point("prog", fail(Pix2SeqError("data.root: empty"))) == 2
    assert capsys.readouterr().err == "prog: error: data.root: empty\n"
    assert run_entry_point("prog", fail(PermissionError(13, "Permission denied", "out/x.json"))) == 2
    assert capsys.readouterr().err == "prog: error: out/x.json: permission denied\n"
    bad_yaml = fail(yaml.YAMLError("mapping values are not allowed\n  in x"))
    assert run_entry_point("prog", bad_yaml) == 2
    assert capsys.readouterr().err == "prog: error: mapping values are not allowed; in x\n"
    assert run_entry_point("prog", fail(KeyboardInterrupt())) == 130
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_entry_point("prog", lambda: 1 / 0)
    monkeypatch.setenv("PIX2SEQ_DEBUG", "1")
    assert run_entry_point("prog", fail(Pix2SeqError("x: bad"))) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.endswith("prog: error: x: bad\n")


@pytest.mark.slow
def test_real_processes_print_one_line_and_exit_2(tmp_path):
    """The scripts as DVC and make run them: no traceback, status 2, and fast (a bad key fails
    before torch is imported); PIX2SEQ_DEBUG=1 shows the traceback."""
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONPATH": str(REPO / "src")}
    env.pop("PIX2SEQ_DEBUG", None)
    (tmp_path / "params.yaml").write_text("{}\n")
    py = sys.executable
    cases = [
        (
            [str(REPO / "bin" / "pix2seq"), "train", "train.lr=[1"],
            "pix2seq train: error: train.lr: not valid YAML",
        ),
        ([py, "-m", "pix2seq.cli", "eval", "--params", str(tmp_path)], "pix2seq eval: error: "),
        (
            [py, "-m", "pix2seq.cli", "predict", "a.jpg", "eval.top_p=a: b: c"],
            "pix2seq predict: error: override eval.top_p: not valid YAML",
        ),
        (
            [py, str(REPO / "scripts" / "demo_summary.py")],
            "demo_summary: error: reports/eval/metrics.json: no such file or directory",  # the demo has not run
        ),
    ]
    if shutil.which("make"):
        cases.append(
            (["make", "--no-print-directory", "-C", str(REPO), "-o", "setup", "-o", ".venv/.synced", "eval",
              "train.log_every_steps=0", f"PY={py}"], "pix2seq eval: error: train.log_every_steps: must be >= 1")
        )  # fmt: skip
    for cmd, message in cases:
        r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (cmd, r.stderr)  # make's own status for a failed recipe is 2 too
        assert "Traceback" not in r.stderr and message in r.stderr, (cmd, r.stderr)
    r = subprocess.run(
        [str(REPO / "bin" / "pix2seq"), "train", "train.lr=[1"], cwd=tmp_path,
        env={**env, "PIX2SEQ_DEBUG": "1"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and "Traceback" in r.stderr and "pix2seq train: error: train.lr" in r.stderr


def test_resume_never_moves_earlier_checkpoints_aside(tmp_path, capsys):
    """train.resume=never starts a new run without overwriting the last one's checkpoints."""
    from pix2seq import distributed as dist
    from pix2seq.config import config_from_dict
    from pix2seq.training import resumable_checkpoint

    cfg = config_from_dict({}, [f"train.output_dir={tmp_path}", "train.resume=never"])
    mgr = CheckpointManager(tmp_path / "checkpoints")
    mgr.save({"global_step": 3}, step=3, is_best=True)
    (tmp_path / "mlflow_run_id").write_text("abc\n")
    assert resumable_checkpoint(cfg, mgr, tmp_path, dist.init_distributed()) is None
    (aside,) = tmp_path.glob("previous-*")
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["best.pt", "ckpt-3.pt", "last.pt"]
    assert (aside / "mlflow_run_id").read_text() == "abc\n" and not (tmp_path / "checkpoints").exists()
    assert (
        f"not resuming {mgr.last_path} (train.resume is never): moved it to {aside}"
        in capsys.readouterr().out
    )

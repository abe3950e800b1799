"""The prepare stage on a hand-made COCO fixture with every kind of problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torchvision.io import encode_jpeg, encode_png

from pix2seq.config import PrepareConfig
from pix2seq.data.prepare import PrepareError, load_coco_json, prepare_dataset

REPO = Path(__file__).resolve().parents[1]

# torchvision 0.29 deprecates its image codecs (TorchCodec is not a dependency); they are what we test
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities:DeprecationWarning"
)


def _jpeg(h: int, w: int) -> bytes:
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    img[0, h // 4 : h // 2, w // 4 : w // 2] = 255
    return bytes(encode_jpeg(img, quality=90).numpy())


def _write_split(
    root: Path, split: str, images: list[dict], anns: list[dict], cats: list[dict], files: dict
) -> None:
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / split / name).write_bytes(data)
    coco = {"images": images, "annotations": anns, "categories": cats}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))


CATS = [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}, {"id": 11, "name": "eleven"}]


def _im(i: int, w: int = 40, h: int = 30) -> dict:
    return {"id": i, "file_name": f"{i:06d}.jpg", "width": w, "height": h}


def _ann(aid: int, iid: int, bbox, cat: int = 3, crowd: int = 0) -> dict:
    return {"id": aid, "image_id": iid, "category_id": cat, "bbox": bbox, "area": 1.0, "iscrowd": crowd}


@pytest.fixture
def fixture_root(tmp_path) -> Path:
    """train: 10 images, one truncated JPEG (id 2) and one missing file (id 4); every box problem."""
    root = tmp_path / "ds"
    good = _jpeg(30, 40)
    images = [_im(i) for i in range(1, 11)]
    images[4] = {"id": 5, "file_name": "000005.png", "width": 40, "height": 30}
    files = {f"{i:06d}.jpg": good for i in range(1, 11) if i not in (2, 4, 5)}
    files["000002.jpg"] = good[: len(good) // 2]  # truncated
    files["000005.png"] = bytes(encode_png(torch.zeros(3, 30, 40, dtype=torch.uint8)).numpy())
    anns = [
        _ann(101, 1, [5, 5, 10, 10], cat=3),  # good
        _ann(102, 1, [30, 20, 20, 20], cat=11),  # partly outside: clamped to [30, 20, 40, 30]
        _ann(103, 3, [50, 40, 5, 5]),  # entirely outside the 40x30 image
        _ann(104, 3, [10, 10, 0, 0]),  # zero area
        _ann(105, 3, [1, 1, 10, 10], crowd=1),  # crowd
        _ann(106, 6, [1, 1, 10, 10], cat=99),  # unknown category id
        _ann(107, 999, [1, 1, 10, 10]),  # unknown image id
        _ann(108, 6, [1, 1, "x", 10]),  # malformed bbox
        _ann(109, 2, [1, 1, 10, 10]),  # on the truncated image
        _ann(110, 5, [2, 2, 8, 8], cat=7),  # on the PNG
        _ann(111, 7, [0.5, 0.5, 0.6, 12]),  # 0.6 px wide: kept (official), dropped by min_box_size 1
    ]
    _write_split(root, "train2017", images, anns, CATS, files)
    _write_split(root, "val2017", [_im(1)], [_ann(201, 1, [0, 0, 40, 30], cat=7)], CATS, {"000001.jpg": good})
    return root


def _prepare(root: Path, tmp_path: Path, **pcfg):
    out = tmp_path / "prepared"
    report = tmp_path / "reports" / "prepare.json"
    cfg = PrepareConfig(**{"max_bad_fraction": 0.5, **pcfg})
    result = prepare_dataset(root, ["train2017", "val2017"], out, report, cfg, workers=2, progress=False)
    return result, out, report


def test_every_problem_is_counted_and_named(fixture_root, tmp_path):
    result, out, report_path = _prepare(fixture_root, tmp_path)
    assert json.loads(report_path.read_text()) == result
    tr = result["train2017"]
    assert tr["images_total"] == 10 and tr["images_kept"] == 8 and tr["images_bad"] == 2
    assert tr["images_bad_by_reason"]["corrupt"] == 1 and tr["images_bad_by_reason"]["missing"] == 1
    assert tr["images_bad_fraction"] == pytest.approx(0.2)
    drop = tr["boxes_dropped_by_reason"]
    assert drop == {
        "crowd": 1,
        "ignore": 0,
        "ambiguous_image": 0,
        "duplicate": 0,
        "degenerate": 1,
        "outside_image": 1,
        "unknown_category": 1,
        "unknown_image": 1,
        "malformed": 1,
        "bad_image": 1,
    }
    assert tr["boxes_total"] == 11 and tr["boxes_kept"] == 4 and tr["boxes_clamped"] == 1
    assert tr["boxes_dropped"] == 7

    issues = json.loads((out / "issues.json").read_text())["train2017"]
    text = "\n".join(issues)
    assert "000002.jpg: cannot decode" in text
    assert "000004.jpg: image file not found" in text
    ann_file = str(fixture_root / "annotations" / "instances_train2017.json")
    assert f"{ann_file}: annotation 106: field 'category_id' 99 is not a known category" in text
    assert f"{ann_file}: annotation 107: field 'image_id' 999 is not in images" in text
    assert f"{ann_file}: annotation 108: field 'bbox' must be 4 finite numbers" in text
    assert f"{ann_file}: annotation 103: box" in text and "outside" in text
    assert f"{ann_file}: annotation 104: box [10, 10, 0, 0] has no area after clamping" in text


def test_manifest_contents(fixture_root, tmp_path):
    _, out, _ = _prepare(fixture_root, tmp_path)
    m = json.loads((out / "train2017.json").read_text())
    # contiguous labels sorted by category id: 3 -> 0, 7 -> 1, 11 -> 2
    assert m["categories"] == [
        {"id": 3, "name": "three"},
        {"id": 7, "name": "seven"},
        {"id": 11, "name": "eleven"},
    ]
    ids = [im[0] for im in m["images"]]
    assert ids == [1, 3, 5, 6, 7, 8, 9, 10]  # 2 (truncated) and 4 (missing) excluded
    assert m["images"][0] == [1, "train2017/000001.jpg", 40, 30]
    assert m["images"][2] == [5, "train2017/000005.png", 40, 30]
    assert m["boxes"][0] == [[5, 5, 15, 15], [30, 20, 40, 30]]  # xyxy, the second clamped
    assert m["labels"][0] == [0, 2]
    assert m["boxes"][2] == [[2, 2, 10, 10]] and m["labels"][2] == [1]
    assert m["boxes"][1] == [] and m["labels"][1] == []  # image 3 lost all its boxes but stays
    v = json.loads((out / "val2017.json").read_text())
    assert v["categories"] == m["categories"] and v["images"] == [[1, "val2017/000001.jpg", 40, 30]]


def test_too_many_bad_images_fails_after_reporting(fixture_root, tmp_path):
    with pytest.raises(
        PrepareError,
        match=r"train2017: 2 of 10 images are bad \(20\.00% > .*10\.00%; missing: 1, corrupt: 1\)",
    ):
        _prepare(fixture_root, tmp_path, max_bad_fraction=0.1)
    assert json.loads((tmp_path / "reports" / "prepare.json").read_text())["train2017"]["images_bad"] == 2
    assert not (tmp_path / "prepared" / "train2017.json").exists()  # nothing that looks valid
    assert not (tmp_path / "prepared" / "val2017.json").exists()  # a failed prepare writes no manifest


def test_size_mismatch_and_no_decode_mode(fixture_root, tmp_path):
    coco_path = fixture_root / "annotations" / "instances_train2017.json"
    coco = json.loads(coco_path.read_text())
    coco["images"][0]["width"] = 41  # image 1 is really 40x30
    coco_path.write_text(json.dumps(coco))
    result, out, _ = _prepare(fixture_root, tmp_path)
    assert result["train2017"]["images_bad_by_reason"]["size_mismatch"] == 1
    issues = "\n".join(json.loads((out / "issues.json").read_text())["train2017"])
    assert "000001.jpg: decoded size 40x30 differs from the annotation's 41x30" in issues
    # check_images=False reads headers only (cheap): sizes and missing files are still checked
    result, _, _ = _prepare(fixture_root, tmp_path, check_images=False)
    assert result["train2017"]["images_bad_by_reason"]["size_mismatch"] == 1
    assert result["train2017"]["images_bad_by_reason"]["missing"] == 1


def test_min_box_size(fixture_root, tmp_path):
    """Default 0: only boxes without area go (the official rule); a positive size drops thin boxes too."""
    result, out, _ = _prepare(fixture_root, tmp_path, min_box_size=1.0)
    assert result["train2017"]["boxes_dropped_by_reason"]["degenerate"] == 2  # 104 and the 0.6 px 111
    issues = "\n".join(json.loads((out / "issues.json").read_text())["train2017"])
    assert "annotation 111: box [0.5, 0.5, 0.6, 12] is smaller than data.prepare.min_box_size=1" in issues
    # box 101 (10x10) and the clamped 102 (10x10) now fall below the limit; 110 (8x8) too: a
    # training split without a single box is an error, not a run that trains on nothing
    with pytest.raises(
        PrepareError,
        match=r"train2017: no boxes to train or evaluate on \(11 annotations; dropped: degenerate: 6, outside_image: 1",
    ):
        _prepare(fixture_root, tmp_path, min_box_size=11.0)
    report = json.loads((tmp_path / "reports" / "prepare.json").read_text())
    assert report["train2017"]["boxes_kept"] == 0 and report["val2017"]["boxes_kept"] == 1


def test_malformed_json_names_file_and_position(tmp_path):
    p = tmp_path / "annotations" / "instances_train2017.json"
    p.parent.mkdir(parents=True)
    p.write_text('{"images": [1, 2,\n "annotations": ]}')
    with pytest.raises(PrepareError, match=r"instances_train2017.json: malformed JSON at line 2, column"):
        load_coco_json(p)
    p.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(PrepareError, match=r"instances_train2017.json: missing field 'annotations'"):
        load_coco_json(p)
    p.write_text(json.dumps({"images": [], "annotations": {}, "categories": []}))
    with pytest.raises(PrepareError, match=r"field 'annotations' must be a list"):
        load_coco_json(p)
    with pytest.raises(PrepareError, match="instances_val2017.json: annotation file not found"):
        load_coco_json(tmp_path / "annotations" / "instances_val2017.json")


def test_malformed_image_entries_and_conflicting_categories(fixture_root, tmp_path):
    coco_path = fixture_root / "annotations" / "instances_train2017.json"
    coco = json.loads(coco_path.read_text())
    coco["images"].append({"id": 50, "file_name": "../escape.jpg", "width": 4, "height": 4})
    coco["images"].append({"id": 51, "file_name": "x.jpg", "width": 4})
    coco["images"].append(dict(coco["images"][0]))  # duplicate id 1
    coco_path.write_text(json.dumps(coco))
    result, out, _ = _prepare(fixture_root, tmp_path, max_bad_fraction=1.0)
    bad = result["train2017"]["images_bad_by_reason"]
    assert bad["malformed"] == 2 and bad["duplicate_id"] == 1
    issues = "\n".join(json.loads((out / "issues.json").read_text())["train2017"])
    assert "images[11] (id 51): missing field 'height'" in issues

    val_path = fixture_root / "annotations" / "instances_val2017.json"
    val = json.loads(val_path.read_text())
    val["categories"][0]["name"] = "renamed"
    val_path.write_text(json.dumps(val))
    with pytest.raises(PrepareError, match="category id 7 is named 'renamed' here but 'seven'"):
        _prepare(fixture_root, tmp_path)


def test_missing_split_directory(tmp_path):
    root = tmp_path / "ds"
    _write_split(root, "val2017", [_im(1)], [], CATS, {"000001.jpg": _jpeg(30, 40)})
    (root / "annotations" / "instances_train2017.json").write_text(
        json.dumps({"images": [], "annotations": [], "categories": CATS})
    )
    with pytest.raises(PrepareError, match=r"train2017: images directory missing"):
        _prepare(root, tmp_path)


def test_val_only_download_prepares_the_validation_split_alone(tmp_path):
    """data.download.subset: val fetches val2017 alone (evaluation only): prepare makes its manifest;
    with subset all the missing training split is an error."""
    from pix2seq.config import config_from_dict
    from pix2seq.data.prepare import run_prepare

    root = tmp_path / "coco"
    _write_split(
        root, "val2017", [_im(1)], [_ann(201, 1, [0, 0, 40, 30], cat=7)], CATS, {"000001.jpg": _jpeg(30, 40)}
    )
    data = {"source": "coco", "root": str(root), "prepared_dir": str(tmp_path / "prep")}
    cfg = config_from_dict({"data": {**data, "download": {"subset": "val"}}})
    report = run_prepare(cfg, tmp_path / "prepare.json", progress=False)
    assert sorted(p.name for p in (tmp_path / "prep").glob("*2017.json")) == ["val2017.json"]
    assert report["val2017"]["boxes_kept"] == 1 and "train2017" not in report
    with pytest.raises(PrepareError, match="instances_train2017.json: annotation file not found"):
        run_prepare(config_from_dict({"data": data}), tmp_path / "prepare.json", progress=False)


def test_prepare_command_on_generated_data(tiny_generated, tmp_path, monkeypatch, capsys):
    """`pix2seq prepare` reads params.yaml in the working directory and writes the report."""
    from pix2seq.cli import main

    root, _ = tiny_generated
    params = {"data": {"root": str(root), "prepared_dir": "prepared"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    assert main(["prepare"]) == 0
    report = json.loads((tmp_path / "reports" / "prepare.json").read_text())
    assert report["train2017"]["images_kept"] == 24 and report["val2017"]["images_kept"] == 8
    assert report["num_categories"] == 3
    m = json.loads((tmp_path / "prepared" / "train2017.json").read_text())
    assert len(m["images"]) == 24 and (Path(m["root"]) / m["images"][0][1]).is_file()
    capsys.readouterr()
    assert main(["prepare", "data.prepare.max_bad_fraction=2.0"]) == 2  # a config error: one line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pix2seq prepare: error: data.prepare.max_bad_fraction:"), err


def test_duplicate_ids_are_reported_and_never_move_boxes(fixture_root, tmp_path):
    """Issue 15 row 5: repeated annotation ids are reported (an exact repeat is dropped); an image
    id two files claim loses its boxes instead of lending them to the other file."""
    coco_path = fixture_root / "annotations" / "instances_train2017.json"
    coco = json.loads(coco_path.read_text())
    coco["annotations"].append(dict(coco["annotations"][0]))  # 101 again, same box: dropped
    coco["annotations"].append({**coco["annotations"][0], "bbox": [20, 5, 10, 10]})  # 101, another box: kept
    other = {"id": 6, "file_name": "000001.jpg", "width": 40, "height": 30}  # id 6 also names 000001.jpg
    coco["images"].append(other)
    coco["annotations"].append(_ann(112, 6, [2, 2, 8, 8]))  # whose is it? nobody's
    coco_path.write_text(json.dumps(coco))
    result, out, _ = _prepare(fixture_root, tmp_path)
    tr = result["train2017"]
    assert tr["annotation_ids_duplicated"] == 2 and tr["boxes_dropped_by_reason"]["duplicate"] == 1
    assert (
        tr["images_bad_by_reason"]["duplicate_id"] == 2
        and tr["boxes_dropped_by_reason"]["ambiguous_image"] == 2
    )
    m = json.loads((out / "train2017.json").read_text())
    ids = [im[0] for im in m["images"]]
    assert 6 not in ids and ids == [1, 3, 5, 7, 8, 9, 10]
    assert m["boxes"][0] == [[5, 5, 15, 15], [30, 20, 40, 30], [20, 5, 30, 15]]  # 101's twin is image 1's
    issues = "\n".join(json.loads((out / "issues.json").read_text())["train2017"])
    assert "annotation 101: repeats annotation #0 (same id, same box); dropped" in issues
    assert "annotation 101: id also used by annotation #0 with another box; both kept" in issues
    assert "images[10] (id 6): image id 6 also names '000006.jpg' (images[5]); both entries" in issues
    assert "annotation 112: field 'image_id' 6 names two different image files; dropped" in issues


def test_objects_beyond_max_instances_are_reported(fixture_root, tmp_path, caplog):
    """Issue 15 row 9: images with more objects than a sequence holds are counted and logged."""
    coco_path = fixture_root / "annotations" / "instances_train2017.json"
    coco = json.loads(coco_path.read_text())
    coco["annotations"] += [_ann(300 + k, 8, [k, k, 5, 5]) for k in range(5)]  # image 8: 5 boxes
    coco_path.write_text(json.dumps(coco))
    result = prepare_dataset(
        fixture_root, ["train2017", "val2017"], tmp_path / "p", None, PrepareConfig(max_bad_fraction=0.5),
        workers=2, progress=False, max_instances=2,
    )  # fmt: skip
    tr = result["train2017"]
    assert tr["max_boxes_per_image"] == 5
    assert tr["images_over_max_instances"] == 1 and tr["boxes_over_max_instances"] == 3
    assert result["val2017"]["images_over_max_instances"] == 0
    assert (
        "train2017: 1 images hold more than tokenizer.max_instances=2 objects (up to 5; 3 objects beyond"
        in caplog.text
    )


def test_ground_truth_keeps_what_coco_counts(fixture_root, tmp_path):
    """The evaluation ground truth is the manifest's: clamped boxes clamped, dropped boxes absent,
    COCO's area kept, crowd regions kept as crowd (ignored by COCO), fresh annotation ids."""
    from pix2seq.data.ground_truth import coco_ground_truth
    from pix2seq.evaluation.coco import coco_evaluate

    _, out, _ = _prepare(fixture_root, tmp_path)
    gt = coco_ground_truth(out / "train2017.json")
    assert [im["id"] for im in gt["images"]] == [1, 3, 5, 6, 7, 8, 9, 10]
    by_image = {}
    for a in gt["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    assert [a["bbox"] for a in by_image[1]] == [[5, 5, 10, 10], [30, 20, 10, 10]]  # 102 clamped
    assert all(a["area"] == 1.0 for a in gt["annotations"])  # COCO's own area, not the box's
    (crowd,) = by_image[3]  # 103 outside, 104 empty: gone; 105 the crowd region
    assert crowd["iscrowd"] == 1 and crowd["ignore"] == 1 and crowd["bbox"] == [1, 1, 10, 10]
    assert [a["id"] for a in gt["annotations"]] == list(range(1, len(gt["annotations"]) + 1))
    # a detector that finds every real box scores 100; one on the crowd region costs nothing
    dets = [{**a, "score": 0.9} for a in gt["annotations"]]
    assert coco_evaluate(gt, dets).metrics["AP"] == pytest.approx(100.0)

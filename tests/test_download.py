"""The download stage against a local HTTP server (127.0.0.1, Range support): resume, checksums,
safe extraction, idempotent re-runs and clear errors. Nothing here reaches the internet."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import stat
import time
import zipfile
from http.server import BaseHTTPRequestHandler

import pytest
from conftest import LocalHTTPServer, serving

from pix2seq import fetch
from pix2seq.config import DownloadConfig, config_from_dict
from pix2seq.data import download as dl
from pix2seq.data.download import (
    ANNOTATIONS_ZIP,
    ARCHIVES,
    TRAIN_ZIP,
    VAL_ZIP,
    DownloadError,
    download_coco,
    run_download,
    safe_extract,
)

# ------------------------------------------------------------------------------ test server


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:  # noqa: N802
        srv: _Server = self.server  # type: ignore[assignment]
        rng = self.headers.get("Range")
        srv.log.append((self.path, rng))
        data = srv.files.get(self.path)
        if srv.delay_s:
            time.sleep(srv.delay_s)
        if data is None:
            body = b"not found"
            self.send_response(404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        start = 0
        if rng and srv.ranges:
            start = int(rng.split("=", 1)[1].split("-", 1)[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/zip")
        self.end_headers()
        cut = srv.cut_after.pop(self.path, None)
        if cut is not None:  # send part of the body, then drop the connection
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


class _Server(LocalHTTPServer):
    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.log: list[tuple[str, str | None]] = []
        self.cut_after: dict[str, int] = {}
        self.delay_s = 0.0
        self.ranges = True

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def server():
    with serving(_Server()) as srv:
        yield srv


# ------------------------------------------------------------------------------ archives


def _zip(
    entries: dict[str, bytes], extra: list[zipfile.ZipInfo | tuple[zipfile.ZipInfo, bytes]] = ()
) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for item in extra:
            info, data = item if isinstance(item, tuple) else (item, b"x")
            zf.writestr(info, data)
    return buf.getvalue()


def _coco_json(split: str, n: int) -> bytes:
    images = [{"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "width": 8, "height": 8} for i in range(n)]
    anns = [
        {"id": 100 + i, "image_id": i + 1, "category_id": 1, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0}
        for i in range(n)
    ]
    return json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}
    ).encode()


def _archives(n_train: int = 5, n_val: int = 3) -> dict[str, bytes]:
    # large enough (incompressible bytes) that a cut-off after 1000 bytes is really midway
    import random

    rnd = random.Random(0)

    def blob(k: int) -> bytes:
        return bytes(rnd.getrandbits(8) for _ in range(k))

    return {
        VAL_ZIP: _zip({f"val2017/{i + 1:012d}.jpg": blob(3000) for i in range(n_val)}),
        TRAIN_ZIP: _zip({f"train2017/{i + 1:012d}.jpg": blob(1000) for i in range(n_train)}),
        ANNOTATIONS_ZIP: _zip(
            {
                "annotations/instances_train2017.json": _coco_json("train2017", n_train),
                "annotations/instances_val2017.json": _coco_json("val2017", n_val),
            }
        ),
    }


def _serve(server: _Server, archives: dict[str, bytes]) -> dict[str, dict]:
    """Put the archives at their official paths; return the matching custom manifest."""
    manifest = {}
    for name, data in archives.items():
        path = ARCHIVES[name].url_path
        server.files["/" + path] = data
        manifest[name] = {"size": len(data), "md5": hashlib.md5(data).hexdigest(), "path": path}
    return manifest


def _cfg(server: _Server, **kw) -> DownloadConfig:
    return DownloadConfig(base_url=server.base_url, **{"timeout_s": 5.0, "retries": 2, "workers": 3, **kw})


def _run(server, root, manifest, **kw):
    return download_coco(_cfg(server, **kw), root, manifest=manifest, backoff_s=0.0, progress=False)


# ---------------------------------------------------------------------------------------- tests


def test_published_values_table():
    assert ARCHIVES[VAL_ZIP].size == 815585330 and ARCHIVES[VAL_ZIP].md5 == "442b8da7639aecaf257c1dceb8ba8c80"
    assert (
        ARCHIVES[TRAIN_ZIP].size == 19336861798
        and ARCHIVES[TRAIN_ZIP].md5 == "cced6f7f71b7629ddf16f17bbcfab6b2"
    )
    assert ARCHIVES[ANNOTATIONS_ZIP].md5 == "f4bbac642086de4f52a3fdda2de5fa2c"
    assert dl.archive_url("http://images.cocodataset.org/", ARCHIVES[VAL_ZIP]) == (
        "http://images.cocodataset.org/zips/val2017.zip"
    )


def test_full_download_extract_and_rerun_downloads_nothing(server, tmp_path):
    manifest = _serve(server, _archives())
    root = tmp_path / "coco"
    out = _run(server, root, manifest)
    assert sorted(out["extracted"]) == sorted([VAL_ZIP, TRAIN_ZIP, ANNOTATIONS_ZIP])
    assert len(list((root / "train2017").iterdir())) == 5
    assert len(list((root / "val2017").iterdir())) == 3
    assert (root / "annotations" / "instances_val2017.json").is_file()
    assert (tmp_path / "coco-archives" / VAL_ZIP).is_file()  # archives beside, not inside, the dataset
    assert not list(root.glob(".extract-*"))
    stamp = (root / "val2017" / "000000000001.jpg").stat().st_mtime_ns

    server.log.clear()
    out = _run(server, root, manifest)
    assert server.log == [] and out["extracted"] == []
    assert (root / "val2017" / "000000000001.jpg").stat().st_mtime_ns == stamp


def test_cut_off_download_resumes_with_range(server, tmp_path):
    manifest = _serve(server, {VAL_ZIP: _archives()[VAL_ZIP], ANNOTATIONS_ZIP: _archives()[ANNOTATIONS_ZIP]})
    path = "/" + ARCHIVES[VAL_ZIP].url_path
    root = tmp_path / "coco"
    # run 1: no retries, the server drops the connection after 1000 bytes -> error, partial file kept
    server.cut_after[path] = 1000
    with pytest.raises(DownloadError, match="val2017.zip.*(dropped|ended)|(dropped|ended).*val2017.zip"):
        _run(server, root, manifest, subset="val", retries=0)
    part = tmp_path / "coco-archives" / (VAL_ZIP + ".part")
    assert part.stat().st_size == 1000
    assert not (root / "val2017").exists()
    # run 2: resumes from byte 1000 and verifies the md5 over the whole file
    server.log.clear()
    _run(server, root, manifest, subset="val")
    assert (path, "bytes=1000-") in server.log
    assert not part.exists() and len(list((root / "val2017").iterdir())) == 3
    # and within one run: the retry resumes
    server.cut_after[path] = 777
    server.log.clear()
    (tmp_path / "coco-archives" / (VAL_ZIP + ".verified.json")).unlink()
    (tmp_path / "coco-archives" / VAL_ZIP).unlink()
    _run(server, root, manifest, subset="val", retries=1)
    assert [r for p, r in server.log if p == path] == [None, "bytes=777-"]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    manifest = _serve(server, {VAL_ZIP: _archives()[VAL_ZIP], ANNOTATIONS_ZIP: _archives()[ANNOTATIONS_ZIP]})
    server.ranges = False
    server.cut_after["/" + ARCHIVES[VAL_ZIP].url_path] = 1500
    _run(server, tmp_path / "coco", manifest, subset="val", retries=1)
    assert len(list((tmp_path / "coco" / "val2017").iterdir())) == 3


def test_checksum_mismatch_removes_file(server, tmp_path):
    manifest = _serve(server, {VAL_ZIP: _archives()[VAL_ZIP], ANNOTATIONS_ZIP: _archives()[ANNOTATIONS_ZIP]})
    manifest[VAL_ZIP]["md5"] = "0" * 32
    root = tmp_path / "coco"
    with pytest.raises(DownloadError, match=r"val2017.zip: checksum mismatch.*expected 0{32}.*removed"):
        _run(server, root, manifest, subset="val")
    arch = tmp_path / "coco-archives"
    assert not (arch / VAL_ZIP).exists() and not (arch / (VAL_ZIP + ".part")).exists()
    assert not (root / "val2017").exists()


def test_corrupted_bytes_fail_checksum(server, tmp_path):
    archives = {VAL_ZIP: _archives()[VAL_ZIP], ANNOTATIONS_ZIP: _archives()[ANNOTATIONS_ZIP]}
    manifest = _serve(server, archives)
    data = bytearray(archives[VAL_ZIP])
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    server.files["/" + ARCHIVES[VAL_ZIP].url_path] = bytes(data)
    with pytest.raises(DownloadError, match="checksum mismatch"):
        _run(server, tmp_path / "coco", manifest, subset="val")
    assert not list((tmp_path / "coco-archives").glob("val2017.zip*"))


def test_size_mismatch_is_reported(server, tmp_path):
    manifest = _serve(server, {VAL_ZIP: _archives()[VAL_ZIP], ANNOTATIONS_ZIP: _archives()[ANNOTATIONS_ZIP]})
    manifest[VAL_ZIP]["size"] += 10
    with pytest.raises(DownloadError, match="val2017.zip"):
        _run(server, tmp_path / "coco", manifest, subset="val")
    assert not list((tmp_path / "coco-archives").glob("val2017.zip*"))


def test_404_is_a_clear_error(server, tmp_path):
    manifest = _serve(server, {ANNOTATIONS_ZIP: _archives()[ANNOTATIONS_ZIP]})
    manifest[VAL_ZIP] = {"size": 10, "md5": None, "path": "zips/val2017.zip"}  # not served
    with pytest.raises(DownloadError, match=r"404 Not Found: http://127\.0\.0\.1:\d+/zips/val2017\.zip"):
        _run(server, tmp_path / "coco", manifest, subset="val")


def test_timeout_is_a_clear_error(server, tmp_path):
    manifest = _serve(server, {VAL_ZIP: _archives()[VAL_ZIP], ANNOTATIONS_ZIP: _archives()[ANNOTATIONS_ZIP]})
    server.delay_s = 1.0
    t0 = time.perf_counter()
    with pytest.raises(DownloadError, match=r"timed out after 0.2s.*gave up after 2 attempts"):
        _run(server, tmp_path / "coco", manifest, subset="val", timeout_s=0.2, retries=1)
    assert time.perf_counter() - t0 < 10


def test_full_disk_before_and_during_download(server, tmp_path, monkeypatch):
    manifest = _serve(server, {VAL_ZIP: _archives()[VAL_ZIP], ANNOTATIONS_ZIP: _archives()[ANNOTATIONS_ZIP]})

    class Usage:
        free = 1000

    monkeypatch.setattr(dl.shutil, "disk_usage", lambda p: Usage())
    with pytest.raises(DownloadError, match="not enough disk space.*ENOSPC"):
        _run(server, tmp_path / "coco", manifest, subset="val")
    monkeypatch.undo()

    def full(self, chunks, bar):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fetch._PartFile, "append", full)
    with pytest.raises(DownloadError, match=r"disk full \(ENOSPC\) while writing .*\.part"):
        _run(server, tmp_path / "coco", manifest, subset="val")


def test_full_disk_during_extraction_leaves_nothing(server, tmp_path, monkeypatch):
    manifest = _serve(server, {VAL_ZIP: _archives()[VAL_ZIP], ANNOTATIONS_ZIP: _archives()[ANNOTATIONS_ZIP]})
    root = tmp_path / "coco"
    real_copy = dl.shutil.copyfileobj
    calls = {"n": 0}

    def copy(src, dst, length=0):
        calls["n"] += 1
        if calls["n"] == 3:  # fail midway through the archives
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_copy(src, dst, length)

    monkeypatch.setattr(dl.shutil, "copyfileobj", copy)
    with pytest.raises(DownloadError, match="ENOSPC.*extracting"):
        _run(server, root, manifest, subset="val")
    assert not list(root.glob(".extract-*"))
    assert not (root / dl.MARKER_DIR / f"{VAL_ZIP}.extracted.json").exists()
    monkeypatch.undo()
    server.log.clear()
    _run(server, root, manifest, subset="val")  # the verified archives are reused
    assert server.log == []
    assert len(list((root / "val2017").iterdir())) == 3


def _symlink_info() -> zipfile.ZipInfo:
    info = zipfile.ZipInfo("val2017/link")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize(
    "bad, why",
    [
        (zipfile.ZipInfo("val2017/../../evil.txt"), "'..' path component"),
        (zipfile.ZipInfo("/tmp/evil.txt"), "absolute path"),
        ((_symlink_info(), b"/etc/passwd"), "symbolic link"),
    ],
)
def test_unsafe_archive_is_refused(server, tmp_path, bad, why):
    data = _zip({"val2017/000000000001.jpg": b"ok"}, extra=[bad])
    manifest = _serve(server, {VAL_ZIP: data, ANNOTATIONS_ZIP: _archives()[ANNOTATIONS_ZIP]})
    root = tmp_path / "coco"
    with pytest.raises(DownloadError, match=f"refusing to extract: entry .* is (an? )?{why}"):
        _run(server, root, manifest, subset="val")
    assert not (root / "val2017").exists()
    assert not list(root.glob(".extract-*"))
    assert not (tmp_path / "evil.txt").exists() and not (root.parent.parent / "evil.txt").exists()


def test_safe_extract_merges_and_removes_only_its_own_files(tmp_path):
    z = tmp_path / "a.zip"
    z.write_bytes(_zip({"d/x.txt": b"1", "d/sub/y.txt": b"2"}))
    dest = tmp_path / "out"
    (dest / "d").mkdir(parents=True)
    (dest / "d" / "theirs.txt").write_text("another archive's")
    (dest / "d" / "old.txt").write_text("this archive's, last time")
    files = safe_extract(z, dest, progress=False, previous=["d/old.txt", "d/x.txt"])
    assert files == ["d/x.txt", "d/sub/y.txt"]
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == [
        "d/sub/y.txt",
        "d/theirs.txt",
        "d/x.txt",
    ]
    with pytest.raises(
        DownloadError, match=r"a.zip: refusing to extract: entry 'd/x.txt' is also in other.zip"
    ):
        safe_extract(z, dest, progress=False, others={"d/x.txt": "other.zip"})


def _overlapping(extra: dict[str, bytes]) -> dict[str, bytes]:
    archives = _archives()
    val = {f"val2017/{i + 1:012d}.jpg": b"img" for i in range(3)}
    return {VAL_ZIP: _zip({**val, **extra}), ANNOTATIONS_ZIP: archives[ANNOTATIONS_ZIP]}


def test_an_archive_sharing_a_directory_merges_into_it(server, tmp_path):
    """Issue 15 row 8: the images archive also carries annotations/: the annotations archive's
    files stay (before, the whole annotations/ directory was replaced and the stage exited 0)."""
    manifest = _serve(server, _overlapping({"annotations/README.txt": b"extra"}))
    root = tmp_path / "coco"
    _run(server, root, manifest, subset="val")
    ann = sorted(p.name for p in (root / "annotations").iterdir())
    assert ann == ["README.txt", "instances_train2017.json", "instances_val2017.json"]
    assert len(list((root / "val2017").iterdir())) == 3


def test_archives_whose_entries_collide_are_refused(server, tmp_path, monkeypatch, capsys):
    """Issue 15 row 8: an entry another archive already extracted is refused; the stage exits 2
    with one line naming both archives, and the first archive's files are untouched."""

    manifest = _serve(server, _overlapping({"annotations/instances_val2017.json": b"{}"}))
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv(dl.MANIFEST_ENV, str(tmp_path / "manifest.json"))
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "coco"
    download = {"base_url": server.base_url, "subset": "val", "retries": 0}
    (tmp_path / "params.yaml").write_text(
        json.dumps({"data": {"source": "coco", "root": str(root), "download": download}})
    )
    from pix2seq.cli import main

    assert main(["download"]) == 2  # the stage, as DVC runs it
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("pix2seq download: error: ")]
    archive = tmp_path / "coco-archives" / VAL_ZIP
    assert line == (
        f"pix2seq download: error: {archive}: refusing to extract: entry 'annotations/instances_val2017.json' is also "
        f"in {ANNOTATIONS_ZIP}, already extracted into {root} (the archives overlap; remove one of them from "
        "the download)"
    )
    val = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    assert len(val["images"]) == 3  # the annotations archive's file, not the colliding one
    assert not (root / "val2017").exists() and not list(root.glob(".extract-*"))


def test_subset_and_max_train_images(server, tmp_path):
    manifest = _serve(server, _archives(n_train=6))
    root = tmp_path / "coco"
    _run(server, root, manifest, subset="val")
    assert {p for p, _ in server.log} == {"/zips/val2017.zip", "/annotations/annotations_trainval2017.zip"}
    assert not (root / "train2017").exists()

    _run(server, root, manifest, max_train_images=2)
    files = sorted(p.name for p in (root / "train2017").iterdir())
    assert files == ["000000000001.jpg", "000000000002.jpg"]
    coco = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    assert [im["file_name"] for im in coco["images"]] == files
    assert {a["image_id"] for a in coco["annotations"]} == {1, 2}

    server.log.clear()
    _run(server, root, manifest, max_train_images=0)  # back to everything, without downloading again
    assert server.log == []
    assert len(list((root / "train2017").iterdir())) == 6
    assert len(json.loads((root / "annotations" / "instances_train2017.json").read_text())["images"]) == 6


def test_manifest_file_and_env(server, tmp_path, monkeypatch):
    manifest = _serve(server, {VAL_ZIP: _archives()[VAL_ZIP], ANNOTATIONS_ZIP: _archives()[ANNOTATIONS_ZIP]})
    mfile = tmp_path / "manifest.json"
    mfile.write_text(json.dumps(manifest))
    monkeypatch.setenv(dl.MANIFEST_ENV, str(mfile))
    root = tmp_path / "coco"
    cfg = config_from_dict(
        {
            "data": {
                "source": "coco",
                "root": str(root),
                "download": {"base_url": server.base_url, "subset": "val", "retries": 0, "timeout_s": 5.0},
            }
        }
    )
    summary = run_download(cfg, progress=False)
    assert summary["source"] == "coco" and (root / "val2017").is_dir()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DownloadError, match="bad.json: download manifest is not valid JSON"):
        dl.load_manifest_file(bad)


def test_generated_source_writes_the_generated_dataset(tmp_path):
    root = tmp_path / "gen"
    cfg = config_from_dict(
        {
            "data": {
                "source": "generated",
                "root": str(root),
                "generated": {"image_size": 64, "num_train": 3, "num_val": 2, "max_object_size": 24},
            }
        }
    )
    run_download(cfg, progress=False)
    assert len(list((root / "train2017").glob("*.jpg"))) == 3
    assert len(json.loads((root / "annotations" / "instances_val2017.json").read_text())["images"]) == 2


def test_file_url_base(tmp_path):
    """A mirror on a mounted file system works through a file:// base URL."""
    mirror = tmp_path / "mirror"
    archives = {VAL_ZIP: _archives()[VAL_ZIP], ANNOTATIONS_ZIP: _archives()[ANNOTATIONS_ZIP]}
    manifest = {}
    for name, data in archives.items():
        p = mirror / ARCHIVES[name].url_path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        manifest[name] = {"size": len(data), "md5": hashlib.md5(data).hexdigest()}
    dcfg = DownloadConfig(base_url=mirror.as_uri(), subset="val")
    download_coco(dcfg, tmp_path / "coco", manifest=manifest, progress=False)
    assert len(list((tmp_path / "coco" / "val2017").iterdir())) == 3

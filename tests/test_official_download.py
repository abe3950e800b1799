"""Official checkpoints: listing, resumable verified download, caching, conversion hand-off and
`official:NAME` wherever a model is named, against a local server that answers like Cloud Storage
(JSON API listing with md5Hash, object reads with Range and x-goog-hash). Nothing reaches the
internet."""

from __future__ import annotations

import base64
import hashlib
import json
import random
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import pytest
import torch
from conftest import LocalHTTPServer, serving

from pix2seq.checkpoint import load_checkpoint, save_checkpoint
from pix2seq.config import config_from_dict
from pix2seq.fetch import DownloadError
from pix2seq.model import build_model  # torchvision before TensorFlow (the other order aborts)
from pix2seq.vocab import Vocab
from pix2seq.weights import official
from pix2seq.weights.init import load_initial_weights

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities:DeprecationWarning"
)

FOLDER = "coco_det_finetune/resnet_640x640"


def _b64_md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


class _Gcs(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _send(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        srv: _Server = self.server  # type: ignore[assignment]
        url = urlparse(self.path)
        rng = self.headers.get("Range")
        srv.log.append((url.path, rng))
        if url.path == f"/storage/v1/b/{official.BUCKET}/o":
            return self._list(srv, parse_qs(url.query))
        name = unquote(url.path.removeprefix(f"/{official.BUCKET}/"))
        if name not in srv.objects:
            return self._send(404, b'{"error": "No such object"}')
        true = srv.objects[name]
        data = srv.served.get(name, true)  # what goes over the wire (may be corrupted)
        headers = {"Accept-Ranges": "bytes"}
        if srv.header_md5:
            headers["x-goog-hash"] = f"crc32c=AAAAAA==,md5={srv.declared.get(name, _b64_md5(true))}"
        start = int(rng.split("=", 1)[1].split("-", 1)[0]) if rng else 0
        body = data[start:]
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self.send_response(206 if start else 200)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = srv.cut_after.pop(name, None)
        if cut is not None:  # part of the body, then the connection drops
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def _list(self, srv: _Server, query: dict[str, list[str]]) -> None:
        prefix = query.get("prefix", [""])[0]
        names = sorted(n for n in srv.objects if n.startswith(prefix))
        start = int(query.get("pageToken", ["0"])[0])
        page = names[start : start + 2]  # two per page: the client must follow nextPageToken
        items = []
        for n in page:
            item = {"name": n, "size": str(len(srv.objects[n]))}
            if srv.listing_md5:
                item["md5Hash"] = _b64_md5(srv.objects[n])
            items.append(item)
        out: dict = {"items": items} if items else {}
        if start + 2 < len(names):
            out["nextPageToken"] = str(start + 2)
        self._send(200, json.dumps(out).encode(), {"Content-Type": "application/json"})


class _Server(LocalHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Gcs)
        rnd = random.Random(0)
        blob = lambda n: bytes(rnd.getrandbits(8) for _ in range(n))  # noqa: E731
        self.objects: dict[str, bytes] = {
            f"{FOLDER}/checkpoint": b'model_checkpoint_path: "ckpt-7"\nall_model_checkpoint_paths: "ckpt-5"\n',
            f"{FOLDER}/config.json": b'{"model": {"name": "encoder_ar_decoder"}}',
            f"{FOLDER}/ckpt-5.index": blob(500),
            f"{FOLDER}/ckpt-5.data-00000-of-00001": blob(2000),
            f"{FOLDER}/ckpt-7.index": blob(3000),
            f"{FOLDER}/ckpt-7.data-00000-of-00001": blob(150_000),
            f"{FOLDER}/eval/events.out": blob(100),  # a subfolder: not part of the checkpoint
        }
        self.served: dict[str, bytes] = {}  # name -> bytes sent instead of the object's
        self.declared: dict[str, str] = {}  # name -> base64 md5 declared instead of the true one
        self.cut_after: dict[str, int] = {}
        self.listing_md5 = True
        self.header_md5 = True
        self.log: list[tuple[str, str | None]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def object_reads(self) -> list[tuple[str, str | None]]:
        return [(p, r) for p, r in self.log if not p.startswith("/storage/")]


@pytest.fixture
def gcs():
    with serving(_Server()) as srv:
        yield srv


class FakeConverter:
    """Stands in for pix2seq.weights.convert.convert_checkpoint: checks it gets the complete
    checkpoint prefix and writes ``out``."""

    def __init__(self) -> None:
        self.calls: list[tuple[Path, str, int]] = []

    def __call__(self, prefix: Path, arch: str, image_size: int, out: Path) -> Path:
        assert Path(f"{prefix}.index").is_file() and Path(f"{prefix}.data-00000-of-00001").is_file()
        self.calls.append((Path(prefix), arch, image_size))
        Path(out).write_bytes(b"converted " + Path(f"{prefix}.index").read_bytes()[:8])
        return Path(out)


def test_resolve_downloads_the_pointed_checkpoint_verifies_converts_and_caches(gcs, tmp_path):
    conv = FakeConverter()
    path = official.resolve(
        "official:resnet_640", cache_dir=tmp_path, url=gcs.url, progress=False, converter=conv
    )
    folder = tmp_path / "resnet_640"
    assert path == folder / "model.pt" and path.is_file()
    assert conv.calls == [(folder / "ckpt-7", "resnet", 640)]
    for name in ("checkpoint", "config.json", "ckpt-7.index", "ckpt-7.data-00000-of-00001"):
        assert (folder / name).read_bytes() == gcs.objects[f"{FOLDER}/{name}"]
    # only what the pointer names: not the older step, not the subfolder
    fetched = {p.rsplit("/", 1)[1] for p, _ in gcs.object_reads()}
    assert fetched == {"checkpoint", "config.json", "ckpt-7.index", "ckpt-7.data-00000-of-00001"}
    assert json.loads((folder / "model.pt.source.json").read_text())["checkpoint"] == "ckpt-7"
    # cached: no network, no second conversion
    n = len(gcs.log)
    assert official.resolve("resnet_640", cache_dir=tmp_path, url=gcs.url, converter=conv) == path
    assert len(gcs.log) == n and len(conv.calls) == 1
    # the converted file gone: converted again from the verified files, nothing fetched again
    path.unlink()
    official.resolve("resnet_640", cache_dir=tmp_path, url=gcs.url, progress=False, converter=conv)
    assert len(gcs.object_reads()) == 4 and len(conv.calls) == 2


def test_interrupted_transfer_resumes_with_a_range_request(gcs, tmp_path):
    data = f"{FOLDER}/ckpt-7.data-00000-of-00001"
    gcs.cut_after[data] = 50_000
    with pytest.raises(DownloadError, match="re-run to resume"):
        official.download("resnet_640", cache_dir=tmp_path, url=gcs.url, progress=False, retries=0)
    part = tmp_path / "resnet_640" / "ckpt-7.data-00000-of-00001.part"
    assert part.stat().st_size == 50_000
    prefix = official.download("resnet_640", cache_dir=tmp_path, url=gcs.url, progress=False)
    assert Path(f"{prefix}.data-00000-of-00001").read_bytes() == gcs.objects[data]
    assert not part.exists()
    assert (f"/{official.BUCKET}/{data}", "bytes=50000-") in gcs.log


@pytest.mark.parametrize("source", ["listing", "header"])
def test_md5_mismatch_is_one_line_and_removes_the_file(gcs, tmp_path, source):
    """Corrupted bytes are caught whichever MD5 the server gives: the listing's md5Hash alone, or
    the x-goog-hash header alone."""
    data = f"{FOLDER}/ckpt-7.data-00000-of-00001"
    bad = bytearray(gcs.objects[data])
    bad[1234] ^= 0xFF
    gcs.served[data] = bytes(bad)
    gcs.listing_md5 = source == "listing"
    gcs.header_md5 = source == "header"
    conv = FakeConverter()
    with pytest.raises(DownloadError) as e:
        official.resolve("resnet_640", cache_dir=tmp_path, url=gcs.url, progress=False, converter=conv)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("ckpt-7.data-00000-of-00001: checksum mismatch")
    assert hashlib.md5(gcs.objects[data]).hexdigest() in msg and msg.endswith("the file was removed")
    folder = tmp_path / "resnet_640"
    assert not (folder / "ckpt-7.data-00000-of-00001").exists()
    assert not (folder / "ckpt-7.data-00000-of-00001.part").exists()
    assert conv.calls == [] and not (folder / "model.pt").exists()


def test_server_declaring_another_md5_than_listed_fails(gcs, tmp_path):
    data = f"{FOLDER}/ckpt-7.index"
    gcs.declared[data] = _b64_md5(b"something else")
    with pytest.raises(
        DownloadError, match=r"ckpt-7.index: the server declares md5 [0-9a-f]{32}, the published"
    ):
        official.download("resnet_640", cache_dir=tmp_path, url=gcs.url, progress=False)
    assert not (tmp_path / "resnet_640" / "ckpt-7.index").exists()


def test_without_a_pointer_the_highest_complete_step_is_taken(gcs, tmp_path):
    del gcs.objects[f"{FOLDER}/checkpoint"]
    del gcs.objects[f"{FOLDER}/ckpt-7.data-00000-of-00001"]  # incomplete: skipped
    prefix = official.download("resnet_640", cache_dir=tmp_path, url=gcs.url, progress=False)
    assert prefix.name == "ckpt-5"


def test_unknown_names_and_unreachable_hosts(gcs, tmp_path):
    with pytest.raises(
        official.OfficialWeightsError, match="unknown official model 'official:resnet_9'; known: resnet_640, "
    ):
        official.resolve("official:resnet_9", cache_dir=tmp_path)
    assert set(official.MODELS) == {f"{a}_{s}" for a in ("resnet", "resnetc") for s in (640, 1024, 1333)}
    assert official.lookup("resnetc_1024").arch == "resnet-c"
    with pytest.raises(DownloadError, match="HTTP 404"):
        official.download("resnet_1333", cache_dir=tmp_path, url=gcs.url + "/nothing-here", progress=False)
    gcs.objects = {}
    with pytest.raises(DownloadError, match="no objects in gs://pix2seq/coco_det_finetune/resnet_640x640/"):
        official.download("resnet_640", cache_dir=tmp_path, url=gcs.url, progress=False)


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(official.CACHE_ENV, str(tmp_path / "c"))
    assert official.cache_root() == tmp_path / "c"
    monkeypatch.delenv(official.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert official.cache_root() == tmp_path / "x" / "pix2seq" / "official"


# ------------------------------------------------------------------------ official:NAME everywhere


def _tiny_model_file(out: Path) -> Path:
    """A real (random-weight) pix2seq model file, as the converter's output would be."""
    cfg = config_from_dict(
        {
            "data": {"image_size": 64},
            "tokenizer": {"bins": 32, "max_instances": 3},
            "model": {"backbone": "resnet18", "backbone_stage": "layer3", "backbone_norm": "group",
                      "d_model": 32, "heads": 2, "mlp_dim": 64, "encoder_layers": 1, "decoder_layers": 1},
        }
    )  # fmt: skip
    vocab = Vocab(2, 32)
    model, _ = build_model(cfg, vocab)
    state = {
        "model": model.state_dict(),
        "config": cfg.to_dict(),
        "vocab": vocab.to_dict(),
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "bicycle"}],
    }
    return save_checkpoint(out, state)


def test_weights_download_command_and_predict_with_official_name(gcs, tmp_path, monkeypatch, capsys):
    from PIL import Image

    from pix2seq.cli import main

    monkeypatch.setenv(official.BASE_URL_ENV, gcs.url)
    monkeypatch.setenv(official.CACHE_ENV, str(tmp_path / "cache"))
    converted: list[Path] = []

    def converter(prefix, arch, image_size, out):
        converted.append(Path(prefix))
        return _tiny_model_file(out)

    monkeypatch.setattr(official, "_default_converter", lambda: converter)

    assert main(["weights", "download", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "resnet_640" in listing and "39.1" in listing and "resnetc_1333" in listing

    assert main(["weights", "download", "resnet_640"]) == 0
    out = capsys.readouterr().out
    model_pt = tmp_path / "cache" / "resnet_640" / "model.pt"
    assert f"resnet_640: {model_pt}" in out and model_pt.is_file()

    assert main(["weights", "download", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "pix2seq weights: error: unknown official model 'nosuch'; known: "
        + ", ".join(official.MODELS)
        + " (see `pix2seq weights download --list`)"
    )

    img = tmp_path / "a.png"
    Image.fromarray(torch.randint(0, 255, (40, 50, 3), dtype=torch.uint8).numpy()).save(img)
    n = len(gcs.log)
    code = main(
        [
            "predict",
            str(img),
            "--model",
            "official:resnet_640",
            "--out",
            str(tmp_path / "p"),
            "--device",
            "cpu",
        ]
    )
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "p" / "detections.json").read_text())
    assert report["model_source"] == f"official:resnet_640 -> {model_pt}"
    assert len(report["images"]) == 1 and len(gcs.log) == n and len(converted) == 1  # from the cache

    # the evaluate stage's eval.checkpoint accepts the name too
    from pix2seq.evaluation.report import checkpoint_for

    assert checkpoint_for(config_from_dict({"eval": {"checkpoint": "official:resnet_640"}})) == model_pt


def test_real_converter_download_to_fine_tune_start(gcs, tmp_path, monkeypatch):
    """A TF checkpoint with the official names and shapes (written here with TensorFlow) served by the
    bucket stand-in -> downloaded, verified, converted by pix2seq.weights.convert ->
    model.init_from fills a run on a 3-category dataset with the official vocabulary."""
    pytest.importorskip("tensorflow", reason="needs the 'official' extra (uv sync --extra official)")
    from test_official_weights import official_variables, random_values, write_checkpoint

    write_checkpoint(tmp_path / "tf" / "ckpt-7", random_values(official_variables("resnet")))
    gcs.objects = {f"{FOLDER}/checkpoint": b'model_checkpoint_path: "ckpt-7"\n'}
    for p in (tmp_path / "tf").glob("ckpt-7.*"):
        gcs.objects[f"{FOLDER}/{p.name}"] = p.read_bytes()
    monkeypatch.setenv(official.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(official.BASE_URL_ENV, gcs.url)
    stored = load_checkpoint(official.resolve("official:resnet_640", progress=False))
    assert stored["vocab"]["layout"] == "official" and len(stored["categories"]) == 80

    cats = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 200, "name": "mine"}]
    tree = stored["config"]
    tree["model"]["init_from"] = "official:resnet_640"
    cfg = config_from_dict(tree)
    vocab = Vocab.for_categories(cats, cfg.tokenizer.bins, cfg.tokenizer.vocab_size, "official")
    model, _ = build_model(cfg, vocab)
    load_initial_weights(model, cfg, vocab, cats)
    rows = [101, 103, 300]  # person and car keep COCO's trained rows; id 200 takes token 300's
    assert torch.equal(
        model.state_dict()["token_embed.weight"][rows], stored["model"]["token_embed.weight"][rows]
    )

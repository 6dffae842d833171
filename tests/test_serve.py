"""`vitdense serve`: the API in process (httpx/TestClient) on a tiny index the tests build, compared with plain
recomputations; every hostile request the service must refuse; atomic reloads under concurrent requests."""
from __future__ import annotations

import asyncio
import io
import json
import os
import struct
import tempfile
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from starlette.testclient import TestClient  # noqa: E402

from conftest import assert_user_error, run_cli, save_tiny_weights  # noqa: E402
from vitdense.commands.retrieval import index_extractor  # noqa: E402
from vitdense.serve import Limits, ServeConfig, Service, create_app, open_index  # noqa: E402
from vitdense.serve.security import image_id  # noqa: E402

NAMES = ["chelsea", "coffee", "astronaut", "rocket"]


def _photo_files(folder: Path, photos) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in NAMES:
        im = Image.fromarray(photos[name])
        im.thumbnail((96, 96))
        out.append(folder / f"{name}.png")
        im.save(out[-1])
    flipped = Image.open(out[0]).transpose(Image.FLIP_LEFT_RIGHT)  # a near duplicate of chelsea
    out.append(folder / "chelsea_flipped.jpg")
    flipped.save(out[-1], quality=95)
    return out


def build_index(folder: Path, out: Path, weights: Path) -> None:
    res = run_cli("index", folder, "--out", out, "--weights", weights, "--device", "cpu", "--load-size", 48,
                  "--workers", 0)
    assert res.exit_code == 0, res.output


@pytest.fixture(scope="module")
def setup(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("serve")
    weights = save_tiny_weights(root / "tiny.safetensors", depth=2)
    coll = root / "collection"
    files = _photo_files(coll, photos)
    secret = root / "secret"
    secret.mkdir()
    Image.fromarray(photos["coffee"][:64, :64]).save(secret / "private.png")
    os.symlink(secret / "private.png", coll / "link_out.png")  # a symlink that leads out of the collection
    build_index(coll, root / "index", weights)
    return {"root": root, "weights": weights, "coll": coll, "files": files, "index": root / "index",
            "secret": secret / "private.png"}


def make_service(index_dir, window_s=0.005, max_batch=32, **kw) -> Service:
    snap = open_index(index_dir)
    extractor = index_extractor(snap.index, index_dir, device="cpu")
    cfg = ServeConfig(str(index_dir), window_s=window_s, max_batch=max_batch, poll_s=0, correspond_load_size=64,
                      **kw)
    return Service(cfg, extractor, snap)


@pytest.fixture(scope="module")
def service(setup):
    return make_service(setup["index"])


@pytest.fixture(scope="module")
def client(service):
    with TestClient(create_app(service, watch=False), raise_server_exceptions=False) as c:
        yield c


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def _one_line_error(res, status: int, *fragments: str) -> None:
    assert res.status_code == status, (res.status_code, res.text)
    assert res.headers["content-type"].startswith("application/json")
    body = res.json()
    assert set(body) == {"error"} and "\n" not in body["error"] and "Traceback" not in res.text
    for fragment in fragments:
        assert fragment in body["error"], (fragment, body["error"])


def _brute_force(service: Service, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """Scores of every indexed image against a query, recomputed plainly (one forward pass, numpy dot)."""
    from vitdense.retrieval import global_descriptors, preprocess_image

    ext, desc = service.extractor, service.snapshot.index.descriptor
    q = global_descriptors(ext, preprocess_image(image, desc, ext.mean, ext.std)[None], desc)[0].numpy()
    scores = np.asarray(service.snapshot.index.vectors) @ q
    order = [i for i in np.argsort(-scores, kind="stable") if i not in service.snapshot.hidden]  # outside: unnamed
    return scores, np.array(order)


# ----------------------------------------------------------------------------------------- the API

def test_health_stats_and_page(client, service, setup):
    assert client.get("/health").json() == {"status": "ok", "images": 6, "generation": 1}
    stats = client.get("/stats").json()
    assert stats["images"] == 6 and stats["backbone"]["fingerprint"] == service.snapshot.index.backbone["fingerprint"]
    assert stats["backbone"]["model"] and stats["dim"] == service.snapshot.index.vectors.shape[1]
    page = client.get("/")
    assert page.status_code == 200 and "<script src=\"/static/app.js\">" in page.text
    assert "http" not in page.text.replace("http-equiv", "")  # nothing from a CDN
    assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    assert page.headers["x-content-type-options"] == "nosniff" and "default-src 'self'" in \
        page.headers["content-security-policy"]


def test_search_upload_matches_a_plain_recomputation(client, service, setup, photos):
    query = Image.fromarray(photos["coffee"][40:360, 60:560])
    query.thumbnail((120, 120))
    res = client.post("/search?k=3", content=_png(np.asarray(query)), headers={"content-type": "image/png"})
    assert res.status_code == 200, res.text
    hits = res.json()["results"]
    scores, order = _brute_force(service, query)
    entries = service.snapshot.index.entries
    assert [h["id"] for h in hits] == [image_id(entries[i].path) for i in order[:3]]
    np.testing.assert_allclose([h["score"] for h in hits], scores[order[:3]], atol=1e-4)
    assert [h["rank"] for h in hits] == [1, 2, 3] and hits[0]["name"] == Path(entries[order[0]].path).name
    # the same upload as a multipart form (what the page sends)
    form = client.post("/search?k=3", files={"image": ("q.png", _png(np.asarray(query)), "image/png")})
    assert [h["id"] for h in form.json()["results"]] == [h["id"] for h in hits]
    stats = client.get("/stats").json()
    assert stats["queries_served"] >= 2 and stats["latency"]["search_upload"]["p50_ms"] > 0


def test_search_by_id_uses_the_stored_vector(client, service):
    snap = service.snapshot
    vectors = np.asarray(snap.index.vectors)
    row = [Path(e.path).name for e in snap.index.entries].index("chelsea.png")
    res = client.get(f"/search?id={snap.ids[row]}&k=4").json()
    scores = vectors @ vectors[row]
    scores[row] = -np.inf  # the query itself is left out, and the image outside the collection
    scores[list(snap.hidden)] = -np.inf
    order = np.argsort(-scores, kind="stable")[:4]
    assert np.isfinite(scores[order]).all()
    assert [h["id"] for h in res["results"]] == [snap.ids[i] for i in order]
    np.testing.assert_allclose([h["score"] for h in res["results"]], scores[order], atol=1e-5)
    assert res["query"]["name"] == "chelsea.png"


def test_image_and_cached_thumbnail(client, service, setup):
    id_ = image_id(str(setup["files"][1].resolve()))
    res = client.get(f"/image/{id_}")
    assert res.status_code == 200 and res.content == setup["files"][1].read_bytes()
    assert res.headers["content-type"] == "image/png"
    thumb = client.get(f"/thumb/{id_}")
    im = Image.open(io.BytesIO(thumb.content))
    assert im.format == "JPEG" and max(im.size) <= 256
    original = Image.open(setup["files"][1]).convert("RGB")
    assert im.size == original.size  # small images stay as they are
    assert np.abs(np.asarray(im, np.float32) - np.asarray(original, np.float32)).mean() < 8  # not blank
    before = len(service.thumbs.items)
    assert client.get(f"/thumb/{id_}").content == thumb.content and len(service.thumbs.items) == before


def _recording_batcher(window_s: float, max_batch: int = 32):
    """A Batcher over a stand-in network (the mean of each image) that records its batch sizes."""
    import torch

    from vitdense.serve.service import Batcher

    sizes: list[int] = []

    def embed(batch):
        sizes.append(len(batch))
        return batch.float().mean(dim=(1, 2, 3), keepdim=False)[:, None].numpy()

    return Batcher(embed, window_s=window_s, max_batch=max_batch), sizes, torch


def test_batcher_waits_only_for_announced_queries():
    """A lone query starts at once despite a long window; queries announced while they are being prepared
    are waited for and share its forward pass; a withdrawn announcement ends the wait; every query gets
    its own image's result."""
    import time

    batcher, sizes, torch = _recording_batcher(window_s=5.0)
    try:
        start = time.monotonic()
        assert batcher.submit(torch.full((3, 4, 4), 2.0)).result(timeout=4) == pytest.approx(2.0)
        assert time.monotonic() - start < 2.0 and sizes == [1]  # nothing else was coming: no 5-s wait

        batcher.announce()
        batcher.announce()
        first = batcher.submit(torch.full((3, 4, 4), 1.0), announced=True)
        time.sleep(0.3)  # the second is still "being prepared": the first waits for it
        assert not first.done()
        second = batcher.submit(torch.full((3, 4, 4), 3.0), announced=True)
        assert (first.result(timeout=4), second.result(timeout=4)) == (pytest.approx(1.0), pytest.approx(3.0))
        assert sizes == [1, 2]

        batcher.announce()
        batcher.announce()
        start = time.monotonic()
        third = batcher.submit(torch.full((3, 4, 4), 5.0), announced=True)
        time.sleep(0.2)
        batcher.withdraw()  # the other announced query was refused: nothing left to wait for
        assert third.result(timeout=4) == pytest.approx(5.0) and time.monotonic() - start < 2.0
        assert sizes == [1, 2, 1]
        assert batcher.batched == 4 and batcher.largest == 2 and batcher.forward_s > 0
    finally:
        batcher.stop()


def test_batcher_window_bounds_the_wait_and_max_batch_splits():
    """An announced query that never comes delays a batch by the window at most; more queued queries than
    max_batch go through in several passes, in order."""
    import time

    batcher, sizes, torch = _recording_batcher(window_s=0.2, max_batch=3)
    try:
        batcher.announce()  # never submitted nor withdrawn
        start = time.monotonic()
        assert batcher.submit(torch.zeros(3, 4, 4)).result(timeout=4) == pytest.approx(0.0)
        assert 0.15 <= time.monotonic() - start < 3.0 and sizes == [1]
        futures = [batcher.submit(torch.full((3, 4, 4), float(i))) for i in range(7)]  # still announced: grouped
        assert [f.result(timeout=4) for f in futures] == [pytest.approx(float(i)) for i in range(7)]
        assert sizes[0] == 1 and sum(sizes[1:]) == 7 and max(sizes) <= 3 and batcher.largest <= 3
        batcher.withdraw()
        batcher.stop()  # a query submitted after a stop is still answered (by a new thread)
        assert batcher.submit(torch.ones(3, 4, 4)).result(timeout=4) == pytest.approx(1.0)
    finally:
        batcher.stop()


def test_batched_queries_equal_single_ones(setup, photos):
    """Eight uploads arriving together share forward passes, with the results of one-at-a-time queries."""
    import httpx

    batched = make_service(setup["index"], window_s=0.3, max_batch=32)
    single = make_service(setup["index"], window_s=0.0, max_batch=1)
    queries = []
    for i in range(8):
        im = Image.fromarray(photos[NAMES[i % 4]]).resize((80, 64))
        queries.append(_png(np.asarray(im)[:, ::-1] if i >= 4 else np.asarray(im)))

    async def run(svc):
        transport = httpx.ASGITransport(app=create_app(svc, watch=False))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            out = await asyncio.gather(*(c.post("/search?k=6", content=q) for q in queries))
        svc.batcher.stop()
        return [r.json()["results"] for r in out]

    got, want = asyncio.run(run(batched)), asyncio.run(run(single))
    for a, b in zip(got, want):
        assert [h["id"] for h in a] == [h["id"] for h in b]
        np.testing.assert_allclose([h["score"] for h in a], [h["score"] for h in b], atol=1e-4)
    assert single.batcher.largest == 1 and single.batcher.batches == 8
    assert batched.batcher.batches < 8 and batched.batcher.largest > 1
    assert batched.stats()["batching"]["queries"] == 8
    assert batched.stats()["batching"]["forward_ms_per_query"] > 0


def test_refused_upload_does_not_hold_back_later_queries(setup, photos):
    """A refused upload (not an image, too large) ends its announcement: with a 5-s window a later lone query
    is still answered at once."""
    import time

    svc = make_service(setup["index"], window_s=5.0, max_batch=32)
    try:
        with TestClient(create_app(svc, limits=Limits(max_bytes=50_000), watch=False)) as c:
            assert c.post("/search", content=b"not an image").status_code == 422
            assert c.post("/search", content=b"\xff" * 60_000).status_code == 413
            assert svc.batcher._preparing == 0
            start = time.monotonic()
            res = c.post("/search?k=3", content=_png(np.asarray(Image.fromarray(photos["coffee"]).resize((80, 64)))))
            assert res.status_code == 200 and len(res.json()["results"]) == 3
            assert time.monotonic() - start < 4.0
    finally:
        svc.batcher.stop()


def test_correspond_is_the_cli_function(client, service, setup):
    from vitdense.correspond import find_correspondences
    from vitdense.io import load_image

    ids = [image_id(str(p.resolve())) for p in setup["files"]]
    res = client.post(f"/correspond?a={ids[0]}&b={ids[4]}")
    assert res.status_code == 200, res.text
    rec = res.json()
    want = find_correspondences(service.extractor.at_stride(4), load_image(setup["files"][0]),
                                load_image(setup["files"][4]), num_pairs=10, load_size=64)
    assert rec["pairs"] == want.pairs.to_records() and len(rec["pairs"]) > 0
    assert rec["size_a"] == list(want.size_a)
    picture = np.asarray(Image.open(io.BytesIO(__import__("base64").b64decode(rec["picture"].split(",", 1)[1]))))
    assert list(picture.shape[:2]) == rec["picture_size"] and picture.std() > 10
    # an upload for a, an id for b; ?format=png gives the picture itself
    png = client.post(f"/correspond?b={ids[4]}&format=png",
                      files={"a": ("a.png", setup["files"][0].read_bytes(), "image/png")})
    assert png.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png.content))), picture)


def test_heatmap_of_a_point(client, service, setup):
    from vitdense.correspond import default_layer, describe_image
    from vitdense.io import load_image

    ids = [image_id(str(p.resolve())) for p in setup["files"]]
    res = client.post("/heatmap", files={"a": (None, ids[0]), "b": (None, ids[2]), "x": (None, "30"),
                                         "y": (None, "20")})
    assert res.status_code == 200, res.text
    rec = res.json()
    dense = service.extractor.at_stride(4)
    da, _, ga = describe_image(dense, load_image(setup["files"][0]), 64, default_layer(dense.depth), "key", False)
    db, _, gb = describe_image(dense, load_image(setup["files"][2]), 64, default_layer(dense.depth), "key", False)
    token = int(ga.tokens(np.array([[20.0, 30.0]]))[0])
    a = da[token].numpy() / np.linalg.norm(da[token].numpy())
    b = db.numpy() / np.linalg.norm(db.numpy(), axis=1, keepdims=True)
    sims = b @ a
    assert rec["similarity_max"] == pytest.approx(sims.max(), abs=1e-4)
    assert rec["similarity_min"] == pytest.approx(sims.min(), abs=1e-4)
    best = gb.pixels(np.array([int(np.argmax(sims))]))[0]
    assert (rec["best_b"]["y"], rec["best_b"]["x"]) == (round(best[0], 2), round(best[1], 2))
    _one_line_error(client.post("/heatmap", files={"a": (None, ids[0]), "b": (None, ids[2])}), 422, "x")


# ----------------------------------------------------------------------------------------- hostile requests

HOSTILE_PATHS = [
    "../../../../etc/passwd", "..%2F..%2F..%2Fetc%2Fpasswd", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/etc/passwd",
    "%2Fetc%2Fpasswd", "..", "%2e%2e", "....//....//etc/passwd", "0123456789abcdef", "0123456789ABCDEF",
    "0123456789abcdef0", "chelsea.png", "%00", "..%5c..%5cwindows", "%252e%252e%252fetc%252fpasswd",
]


def _raw_get(app, target: str) -> tuple[int, bytes]:
    """GET ``target`` exactly as written (no client-side normalisation of '..'), the way an ASGI server hands
    it over: the path percent-decoded once, the raw bytes kept."""
    from urllib.parse import unquote

    path, _, query = target.partition("?")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": unquote(path), "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
             "headers": [(b"host", b"testserver")], "client": ("127.0.0.1", 1), "server": ("testserver", 80)}
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


@pytest.mark.parametrize("route", ["image", "thumb"])
def test_paths_and_tricks_are_404(client, service, setup, route):
    app = create_app(service, watch=False)
    secret = setup["secret"].read_bytes()
    for trick in HOSTILE_PATHS + [str(setup["secret"]), str(setup["files"][0]), "../secret/private.png"]:
        status, body = _raw_get(app, f"/{route}/{trick}")
        assert status == 404, (trick, status)
        assert set(json.loads(body)) == {"error"} and secret not in body
        res = client.get(f"/{route}/{trick}")  # through a client that normalises: never the file either
        assert res.status_code in (404, 200) and secret not in res.content
        if res.status_code == 200:
            assert res.headers["content-type"].startswith("text/html")  # '/image/..' became '/': the page
    _one_line_error(client.get("/search?id=../../etc/passwd"), 404)
    _one_line_error(client.post("/correspond?a=..%2Fsecret&b=0123456789abcdef"), 404)


def test_symlinks_out_of_the_collection_are_not_served(client, service, setup, tmp_path):
    # indexed through a symlink that leads out of the collection: in the index, never served
    meta = json.loads((setup["index"] / "index.json").read_text())
    assert meta["source"] == str(setup["coll"].resolve()) == service.snapshot.collection  # recorded by `index`
    names = [Path(e.path).name for e in service.snapshot.index.entries]
    assert "private.png" in names
    out_id = service.snapshot.ids[names.index("private.png")]
    _one_line_error(client.get(f"/image/{out_id}"), 404)
    _one_line_error(client.get(f"/thumb/{out_id}"), 404)
    _one_line_error(client.get(f"/search?id={out_id}"), 404)
    listed = client.get(f"/search?id={service.snapshot.ids[0]}&k=100").json()["results"]
    assert len(listed) == 4 and out_id not in {h["id"] for h in listed}  # never named in an answer
    # an indexed file replaced by a symlink to a file elsewhere after indexing: not served either
    victim = setup["files"][3]
    backup = tmp_path / "backup.png"
    os.replace(victim, backup)
    try:
        os.symlink(setup["secret"], victim)
        id_ = image_id(str(victim))
        _one_line_error(client.get(f"/image/{id_}"), 404)
        _one_line_error(client.get(f"/thumb/{id_}"), 404)
    finally:
        victim.unlink()
        os.replace(backup, victim)
    assert client.get(f"/image/{image_id(str(victim))}").status_code == 200


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels with almost no data (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")


def test_bad_uploads_get_one_line_errors(service, setup, photos):
    app = create_app(service, Limits(max_bytes=200_000, max_pixels=50_000), watch=False)
    good = _png(np.asarray(Image.fromarray(photos["rocket"]).resize((100, 80))))
    jpeg = io.BytesIO()
    Image.fromarray(photos["coffee"]).save(jpeg, "JPEG")
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.post("/search", content=good).status_code == 200
        _one_line_error(c.post("/search", content=b""), 422, "empty")
        _one_line_error(c.post("/search", content=b"hello, not an image"), 422, "not an image")
        _one_line_error(c.post("/search", content=good[: len(good) // 2]), 422, "truncated")
        _one_line_error(c.post("/search", content=os.urandom(300_000)), 413, "--max-upload-mb")
        _one_line_error(c.post("/search", content=jpeg.getvalue()), 413)  # 400x600 jpeg: > 200 kB or 50k px
        _one_line_error(c.post("/search", content=_png(np.asarray(Image.fromarray(photos["rocket"]).resize((300, 200))))),
                        413, "300x200 pixels", "--max-pixels")
        _one_line_error(c.post("/search", content=_bomb_png(100_000, 100_000)), 413, "pixels")
        _one_line_error(c.post("/search", files={"other": ("x.png", good, "image/png")}), 422, "'image' field")
        _one_line_error(c.post("/search", content=good, headers={"content-type": "multipart/form-data; boundary=x"}),
                        422)
        for k in ("0", "101", "abc", "-1", "1e3"):
            _one_line_error(c.post(f"/search?k={k}", content=good), 422, "k=")
        _one_line_error(c.get("/search"), 422, "id")
        _one_line_error(c.get("/nowhere"), 404)
        _one_line_error(c.delete("/search"), 405)
        _one_line_error(c.post("/correspond", files={"a": ("a.png", b"junk", "image/png"), "b": (None, "x")}), 422)
        _one_line_error(c.post("/correspond?b=0123456789abcdef"), 422, "'a'")


def test_bomb_refused_by_default_limits(client):
    _one_line_error(client.post("/search", content=_bomb_png(20_000, 20_000)), 413, "pixels")


def test_no_request_writes_anywhere(client, setup, photos, monkeypatch, tmp_path):
    """A multipart upload above the 1 MB at which form parsers spill to temporary files leaves every folder
    as it was: the temporary folder, the index and the collection."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    watched = [tmp, setup["index"], setup["coll"]]

    def state():
        return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for d in watched for p in d.rglob("*")
                if not p.is_symlink()}

    before = state()
    big = np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8)  # ~1.5 MB as PNG
    data = _png(big)
    assert len(data) > 1 << 20
    assert client.post("/search?k=2", files={"image": ("big.png", data, "image/png")}).status_code == 200
    assert client.post("/correspond?b=" + image_id(str(setup["files"][0].resolve())),
                       files={"a": ("big.png", data, "image/png")}).status_code == 200
    assert state() == before and not any(tmp.iterdir())


def test_token_hosts_and_bind_rules(service):
    app = create_app(service, token="s3cret", allowed_hosts=["127.0.0.1", "localhost"], watch=False)
    with TestClient(app, base_url="http://127.0.0.1:8000", raise_server_exceptions=False) as c:
        assert c.get("/health").status_code == 200  # probes need no token
        _one_line_error(c.get("/stats"), 401, "token")
        _one_line_error(c.get("/stats", headers={"Authorization": "Bearer wrong"}), 401)
        _one_line_error(c.get("/"), 401)
        assert c.get("/stats", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/stats?token=s3cret").status_code == 200
        _one_line_error(c.get("/stats?token=s3cret", headers={"Host": "evil.example"}), 400, "Host")
    assert_user_error(run_cli("serve", "nowhere", "--host", "0.0.0.0"), "--host 0.0.0.0", "--token", "--open")
    assert_user_error(run_cli("serve", "nowhere", "--max-upload-mb", "0"), "--max-upload-mb")


# ----------------------------------------------------------------------------------------- reloads

def test_reload_is_atomic_under_concurrent_requests(setup, photos, tmp_path):
    """While `vitdense index` adds images and the service reloads, every answer comes from one whole
    generation: its image count and its ids."""
    import shutil
    import time

    coll = tmp_path / "coll"
    shutil.copytree(setup["coll"], coll, symlinks=True)
    (coll / "link_out.png").unlink()
    index = tmp_path / "index"
    build_index(coll, index, setup["weights"])
    svc = make_service(index)
    app = create_app(svc, watch=False)
    seen: list[dict] = []
    errors: list[str] = []
    stop = threading.Event()
    id_sets: dict[int, set[str]] = {svc.snapshot.generation: set(svc.snapshot.ids)}
    query = svc.snapshot.ids[0]

    def hammer():
        with TestClient(app, raise_server_exceptions=False) as c:
            while not stop.is_set():
                res = c.get(f"/search?id={query}&k=100")
                if res.status_code != 200:
                    errors.append(res.text)
                    continue
                seen.append(res.json())

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for extra in range(2):
            Image.fromarray(photos[NAMES[extra + 1]][::-1]).resize((90, 70)).save(coll / f"new{extra}.png")
            build_index(coll, index, setup["weights"])
            assert svc.reload() is True  # the folder's generation changed
            id_sets[svc.snapshot.generation] = set(svc.snapshot.ids)
            assert svc.reload() is False  # nothing new
        deadline = time.monotonic() + 30  # let the clients see the last generation too (a busy machine)
        while not any(a["generation"] == 3 for a in list(seen)) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors and len(seen) > 5
    counts = {1: 4, 2: 5, 3: 6}  # images other than the query in each generation
    for answer in seen:
        gen = answer["generation"]
        assert len(answer["results"]) == counts[gen]
        assert {h["id"] for h in answer["results"]} <= id_sets[gen]
    assert svc.reloads == 2 and svc.snapshot.generation == 3
    assert {a["generation"] for a in seen} >= {3}


def test_a_broken_generation_keeps_the_old_one(setup, tmp_path):
    import shutil

    index = tmp_path / "index"
    shutil.copytree(setup["index"], index)
    svc = make_service(index)
    meta = json.loads((index / "index.json").read_text())
    meta["generation"] = 7  # names vector/faiss files that do not exist
    (index / "index.json").write_text(json.dumps(meta))
    assert svc.reload() is False and "vectors-7.npy" in svc.reload_error
    assert svc.snapshot.generation == 1 and svc.health()["images"] == 6


def test_the_poller_reloads_a_new_generation(setup, photos, tmp_path):
    import shutil
    import time

    coll = tmp_path / "coll"
    shutil.copytree(setup["coll"], coll, symlinks=True)
    index = tmp_path / "index"
    build_index(coll, index, setup["weights"])
    svc = make_service(index)
    svc.config.poll_s = 0.1
    with TestClient(create_app(svc, watch=True)) as c:  # the lifespan starts the poller
        assert c.get("/health").json()["generation"] == 1
        Image.fromarray(photos["rocket"][::-1]).resize((80, 60)).save(coll / "new.png")
        build_index(coll, index, setup["weights"])
        deadline = time.time() + 20
        while c.get("/health").json()["generation"] != 2:
            assert time.time() < deadline
            time.sleep(0.05)
        assert c.get("/health").json()["images"] == 7


def test_uploads_are_read_as_the_shared_loader_reads_files():
    """A phone photo uploaded with EXIF orientation 6 is used upright (as the browser shows it, so points
    clicked on it mean the same pixels); a transparent PNG is on white."""
    from vitdense.serve.security import decode_upload

    stored = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, format="PNG", exif=exif)
    np.testing.assert_array_equal(np.asarray(decode_upload(buf.getvalue(), Limits())), np.rot90(stored, -1))
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, format="PNG")
    assert (np.asarray(decode_upload(buf.getvalue(), Limits())) == 255).all()

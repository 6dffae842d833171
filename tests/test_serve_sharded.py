"""`vitdense serve` on a sharded index (`vitdense embed` + `vitdense index --embeddings`): a tiny collection of
files and a webdataset tar, served in process; results against ShardedIndex.search, files and tar members
byte for byte, ids that are forged, stale or out of range, ids read lazily, and the one-line start errors."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("httpx")
pytest.importorskip("pyarrow")

from conftest import assert_user_error, run_cli, save_tiny_weights
from starlette.testclient import TestClient
from test_collection import make_images, write_tar
from test_serve import _one_line_error, _png, _raw_get
from test_serve_page import browser  # noqa: E402,F401  (the headless chromium fixture)

from vitdense.collection.embed import ExtractorSpec, ShardRows
from vitdense.collection.engines import embed_collection
from vitdense.collection.index import ShardedIndex, build_index
from vitdense.collection.shards import Collection, read_shard, write_shard
from vitdense.collection.sources import ShardSpec
from vitdense.commands.retrieval import index_extractor
from vitdense.retrieval import DescriptorConfig, global_descriptors, preprocess_image
from vitdense.serve import ServeConfig, Service, create_app, open_index
from vitdense.serve.sharded import ShardedSnapshot

CFG = DescriptorConfig(load_size=32, stride=8)
N_FILES, N_TAR = 7, 4


def _build(emb: Path, out: Path) -> None:
    build_index(emb, out, "64M", index_type="ivfflat", nlist=2, nprobe=2, rerank=8, progress=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    weights = save_tiny_weights(root / "tiny.safetensors", depth=2)
    coll = root / "coll"
    files = make_images(coll / "img", N_FILES)
    (coll / "tars").mkdir()
    write_tar(coll / "tars" / "00000.tar", N_TAR)
    embed_collection([coll], root / "emb", ExtractorSpec("auto", str(weights), "cpu"), CFG, shard_size=3,
                     num_workers=0, progress=False)
    _build(root / "emb", root / "idx")
    return {"root": root, "coll": coll, "files": files, "tar": coll / "tars" / "00000.tar", "idx": root / "idx",
            "emb": root / "emb", "weights": weights}


def make_service(index_dir, collection=None, id_shards=32) -> Service:
    snap = open_index(index_dir, collection, id_shards=id_shards)
    extractor = index_extractor(snap.index, index_dir, device="cpu")
    cfg = ServeConfig(str(index_dir), collection, poll_s=0, correspond_load_size=64, id_shards=id_shards)
    return Service(cfg, extractor, snap)


@pytest.fixture(scope="module")
def service(setup):
    return make_service(setup["idx"])


@pytest.fixture(scope="module")
def client(service):
    with TestClient(create_app(service, watch=False), raise_server_exceptions=False) as c:
        yield c


def _expected_id(row: int, id_string: str) -> str:
    return f"{row}-{hashlib.blake2b(id_string.encode(), digest_size=8).hexdigest()}"


def _rows(setup) -> tuple[ShardedIndex, list[str]]:
    """The index opened on its own and every row's id string (read plainly from all shards)."""
    idx = ShardedIndex(setup["idx"])
    ids = [i for name in idx.shard_names for i in read_shard(setup["emb"], name, ["id"])["id"]]
    return idx, ids


# ----------------------------------------------------------------------------------------- searching

def test_search_equals_the_sharded_index(client, service, setup):
    idx, ids = _rows(setup)
    assert len(ids) == N_FILES + N_TAR and sum(1 for i in ids if "::" in i) == N_TAR
    query = Image.open(setup["files"][2]).convert("RGB").resize((44, 36))
    res = client.post("/search?k=5", content=_png(np.asarray(query)), headers={"content-type": "image/png"})
    assert res.status_code == 200, res.text
    hits = res.json()["results"]
    ext = service.extractor
    q = global_descriptors(ext, preprocess_image(query, idx.descriptor, ext.mean, ext.std)[None], idx.descriptor)
    scores, rows = idx.search(q.numpy().astype(np.float32), 5)  # what `vitdense search` runs
    names = idx.ids(rows[0])
    assert [h["id"] for h in hits] == [_expected_id(int(r), n) for r, n in zip(rows[0], names)]
    np.testing.assert_allclose([h["score"] for h in hits], scores[0], atol=1e-5)
    assert [h["name"] for h in hits] == [n.rpartition("/")[2] for n in names]
    # by id: the stored vector, the row itself left out
    row = ids.index(next(i for i in ids if "::" in i))  # a tar row
    got = client.get(f"/search?id={_expected_id(row, ids[row])}&k=4").json()
    s, r = idx.search(idx.vectors[np.array([row])], 5)
    keep = [(float(a), int(b)) for a, b in zip(s[0], r[0]) if b != row][:4]
    assert [h["id"] for h in got["results"]] == [_expected_id(b, ids[b]) for _, b in keep]
    np.testing.assert_allclose([h["score"] for h in got["results"]], [a for a, _ in keep], atol=1e-5)
    assert got["query"]["name"] == ids[row].rpartition("/")[2] and got["generation"] == 1


def test_health_stats_and_page_name_the_collection(client, service, setup):
    assert client.get("/health").json() == {"status": "ok", "images": N_FILES + N_TAR, "generation": 1}
    stats = client.get("/stats").json()
    meta = json.loads((setup["idx"] / "index.json").read_text())
    assert stats["images"] == meta["count"] == N_FILES + N_TAR
    assert stats["index"]["kind"] == "sharded" and stats["index"]["factory"] == meta["choice"]["factory"] == "IVF2,Flat"
    assert stats["faiss"] == "ivfflat" and stats["backbone"]["fingerprint"] == meta["backbone"]["fingerprint"]
    assert stats["backbone"]["model"] and stats["dim"] == meta["dim"]
    assert client.get("/").status_code == 200 and "s.index.factory" in client.get("/static/app.js").text


# ----------------------------------------------------------------------------------------- files

def test_image_of_a_file_row_and_of_a_tar_member(client, service, setup):
    _, ids = _rows(setup)
    frow = ids.index(str(setup["files"][4].resolve()))
    res = client.get(f"/image/{_expected_id(frow, ids[frow])}")
    assert res.status_code == 200 and res.content == setup["files"][4].read_bytes()
    assert res.headers["content-type"] == "image/png"
    trow = [n for n, i in enumerate(ids) if "::" in i][2]
    member = ids[trow].split("::", 1)[1]
    with tarfile.open(setup["tar"]) as archive:
        want = archive.extractfile(member).read()
    tid = _expected_id(trow, ids[trow])
    res = client.get(f"/image/{tid}")
    assert res.status_code == 200 and res.content == want and res.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(client.get(f"/thumb/{tid}").content))
    original = Image.open(io.BytesIO(want)).convert("RGB")
    assert thumb.format == "JPEG" and thumb.size == original.size
    assert np.abs(np.asarray(thumb, np.float32) - np.asarray(original, np.float32)).mean() < 12  # the image
    # the page's "why": correspondences between a tar member and a file, both by id
    why = client.post("/correspond", params={"a": tid, "b": _expected_id(frow, ids[frow])})
    assert why.status_code == 200, why.text
    assert why.json()["size_a"] == [original.height, original.width]


def test_forged_stale_out_of_range_and_path_ids_are_404(client, service, setup):
    _, ids = _rows(setup)
    n = len(ids)
    good = _expected_id(3, ids[3])
    assert client.get(f"/image/{good}").status_code == 200
    forged = [f"3-{'0' * 16}", f"3-{_expected_id(4, ids[4]).split('-')[1]}",  # right row, wrong check
              f"{n}-{_expected_id(3, ids[3]).split('-')[1]}", f"{10**14}-{'a' * 16}",  # rows out of range
              f"03-{good.split('-')[1]}", f"-1-{'a' * 16}", good.upper(), good + "0",
              hashlib.blake2b(ids[3].encode(), digest_size=8).hexdigest()]  # an image-folder id of the same file
    paths = [ids[3], str(setup["tar"]), ids[n - 1], "..%2F..%2Fetc%2Fpasswd", "%2e%2e", f"{good}%2F..%2F..",
             "../emb/manifest.json", "%00"]
    app = create_app(service, watch=False)
    for bad in forged + paths:
        for route in ("image", "thumb"):
            status, body = _raw_get(app, f"/{route}/{bad}")
            assert status == 404, (route, bad, status)
            assert set(json.loads(body)) == {"error"}
        _one_line_error(client.get("/search", params={"id": bad}), 404)
    _one_line_error(client.post("/correspond", params={"a": forged[1], "b": good}), 404)


def test_a_rebuilt_index_turns_stale_ids_into_404(setup, tmp_path):
    """Rows reordered by a rebuild (another embeddings folder, file shard rows reversed): after the reload an
    old id whose row now holds another image is a 404, and the image is found under its new id."""
    _, ids = _rows(setup)
    emb2, out = tmp_path / "emb2", tmp_path / "idx"
    coll = Collection.load(setup["emb"])
    specs = []
    for spec in coll.shards:
        rows = read_shard(setup["emb"], spec.name, ["id", "sha256", "meta", "vector"])
        order = slice(None, None, -1) if spec.kind == "files" else slice(None)
        new = ShardSpec(spec.name, spec.kind, tuple(rows["id"][order]) if spec.kind == "files" else (), spec.tar)
        if spec.kind == "files":
            (emb2 / "inputs").mkdir(parents=True, exist_ok=True)
            (emb2 / "inputs" / f"{spec.name}.txt").write_text("\n".join(new.items) + "\n")
        write_shard(emb2, spec.name, ShardRows(rows["id"][order], rows["sha256"][order], rows["meta"][order],
                                               rows["vector"][order]), 0.0)
        specs.append(new)
    Collection(emb2, coll.backbone, coll.descriptor, coll.dim, specs).write_manifest()
    shutil.copytree(setup["idx"], out)
    svc = make_service(out)
    with TestClient(create_app(svc, watch=False), raise_server_exceptions=False) as client:
        old = _expected_id(0, ids[0])
        assert client.get(f"/image/{old}").status_code == 200
        _build(emb2, out)
        assert svc.reload() and client.get("/health").json()["generation"] == 2
        moved = _rows({"idx": out, "emb": emb2})[1]
        assert moved[0] != ids[0]  # row 0 now holds another image
        _one_line_error(client.get(f"/image/{old}"), 404)
        new = _expected_id(moved.index(ids[0]), ids[0])
        assert client.get(f"/image/{new}").content == Path(ids[0]).read_bytes()


# ----------------------------------------------------------------------------------------- memory and roots

def test_ids_are_read_only_for_the_shards_a_request_touches(setup, monkeypatch):
    from vitdense.serve import sharded

    reads = []
    real = sharded.read_shard
    monkeypatch.setattr(sharded, "read_shard", lambda root, name, cols: reads.append(name) or real(root, name, cols))
    svc = make_service(setup["idx"], id_shards=2)
    snap = svc.snapshot
    assert isinstance(snap, ShardedSnapshot) and reads == [] and len(snap.ids.items) == 0  # start-up reads no id
    _, ids = _rows(setup)
    offsets = snap.index.vectors.offsets
    with TestClient(create_app(svc, watch=False), raise_server_exceptions=False) as client:
        row = int(offsets[2])  # the first row of the third shard
        assert client.get(f"/image/{_expected_id(row, ids[row])}").status_code == 200
        assert list(snap.ids.items) == [2] and reads == [snap.index.shard_names[2]]
        res = client.get(f"/search?id={_expected_id(row, ids[row])}&k=10").json()["results"]
        touched = {int(np.searchsorted(offsets, int(h["id"].split("-")[0]), side="right") - 1) for h in res}
        assert len(snap.ids.items) <= 2 and set(snap.ids.items) <= touched | {2}  # bounded, only those used
        assert len(reads) <= 1 + len(touched | {2})  # the query's shard, then each shard of the answer once


def test_root_narrows_what_is_served_and_named(setup):
    svc = make_service(setup["idx"], collection=str(setup["coll"] / "img"))
    _, ids = _rows(setup)
    assert svc.snapshot.collection == str((setup["coll"] / "img").resolve())
    with TestClient(create_app(svc, watch=False), raise_server_exceptions=False) as client:
        frow = ids.index(str(setup["files"][0].resolve()))
        res = client.get(f"/search?id={_expected_id(frow, ids[frow])}&k=100").json()["results"]
        assert len(res) == N_FILES - 1 and all("::" not in ids[int(h["id"].split("-")[0])] for h in res)
        trow = next(n for n, i in enumerate(ids) if "::" in i)
        _one_line_error(client.get(f"/image/{_expected_id(trow, ids[trow])}"), 404)
    # without --root: the common folder of the embedded files and tars
    assert make_service(setup["idx"]).snapshot.collection == str(setup["coll"].resolve())


def test_served_folder_comes_from_the_recorded_sources_or_for_an_old_manifest_from_its_inputs(
        setup, tmp_path, monkeypatch, caplog):
    """`vitdense embed` records its sources in the manifest: serve takes the folder from there, reading no
    inputs/*.txt and warning of nothing; a manifest without them (embedded before) is served as before, from
    the common folder of the planned files and tars, with a warning."""
    import logging

    from vitdense.serve import sharded

    manifest = json.loads((setup["emb"] / "manifest.json").read_text())
    assert manifest["sources"] == [{"path": str(setup["coll"]), "folder": str(setup["coll"].resolve())}]
    emb = tmp_path / "emb"
    shutil.copytree(setup["emb"], emb)
    _build(emb, tmp_path / "idx")
    _, ids = _rows(setup)
    frow = ids.index(str(setup["files"][0].resolve()))
    trow = next(n for n, i in enumerate(ids) if "::" in i)
    caplog.set_level(logging.INFO, logger="vitdense.serve")
    with monkeypatch.context() as m:
        m.setattr(sharded, "planned_folder", lambda *args: pytest.fail("read inputs/*.txt"))
        assert open_index(tmp_path / "idx").collection == str(setup["coll"].resolve())
        # the recorded folder is the one served: narrowed in the manifest, the tar is no longer named
        narrowed = dict(manifest, sources=[{"path": str(setup["coll"] / "img"),
                                            "folder": str((setup["coll"] / "img").resolve())}])
        (emb / "manifest.json").write_text(json.dumps(narrowed))
        snap = open_index(tmp_path / "idx")
        assert snap.collection == str((setup["coll"] / "img").resolve())
        assert snap.servable(frow) and not snap.servable(trow)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    old = {k: v for k, v in manifest.items() if k != "sources"}
    (emb / "manifest.json").write_text(json.dumps(old))
    svc = make_service(tmp_path / "idx")
    assert svc.snapshot.collection == str(setup["coll"].resolve())
    assert any("does not record its source folders" in r.getMessage() for r in caplog.records)
    with TestClient(create_app(svc, watch=False), raise_server_exceptions=False) as client:
        for row in (frow, trow):
            assert client.get(f"/image/{_expected_id(row, ids[row])}").status_code == 200


def test_moved_embeddings_and_an_interrupted_build_are_one_line_errors(setup, tmp_path):
    emb = tmp_path / "emb"
    shutil.copytree(setup["emb"], emb)
    _build(emb, tmp_path / "idx")
    emb.rename(tmp_path / "moved")
    res = run_cli("serve", tmp_path / "idx", "--device", "cpu")
    assert_user_error(res, str(tmp_path / "idx"), str(emb), "missing or moved")
    shutil.copytree(setup["idx"], tmp_path / "partial")
    (tmp_path / "partial" / "index.json").unlink()  # written last: a build that was interrupted
    assert_user_error(run_cli("serve", tmp_path / "partial", "--device", "cpu"), "incomplete", "re-run")


# ----------------------------------------------------------------------------------------- the page

def test_page_searches_a_sharded_index_in_a_browser(setup, service, browser):
    """The search page on a sharded index in headless chromium: the header names the sharded index, an upload
    shows a grid of all 11 rows (files and tar members) with every thumbnail loaded, a click searches by id."""
    import threading
    import time

    from test_serve_page import _free_port, _wait

    uvicorn = pytest.importorskip("uvicorn")
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(service, watch=False), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    driver = browser
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        _wait(driver, "return document.getElementById('about').textContent.includes('11 images')")
        assert "sharded IVF2,Flat index" in driver.find_element("id", "about").text
        driver.find_element("id", "file").send_keys(str(setup["files"][1]))
        _wait(driver, "return document.body.dataset.results === '11'")
        _wait(driver, "return Array.from(document.querySelectorAll('#grid img')).every(i => i.complete && "
                      "i.naturalWidth > 0)")
        names = driver.execute_script("return Array.from(document.querySelectorAll('#grid .hit .name'))"
                                      ".map(e => e.textContent)")
        assert names[0] == setup["files"][1].name and sum(n.endswith(".jpg") for n in names) == N_TAR
        driver.find_elements("css selector", "#grid .hit img")[1].click()
        _wait(driver, "return document.body.dataset.results === '10' && !document.body.dataset.busy")
        assert driver.execute_script("return document.getElementById('status').className") != "error"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


def test_a_tar_replaced_by_a_symlink_out_of_the_collection_is_not_served(client, setup, tmp_path):
    _, ids = _rows(setup)
    trow = next(n for n, i in enumerate(ids) if "::" in i)
    tid = _expected_id(trow, ids[trow])
    assert client.get(f"/image/{tid}").status_code == 200
    outside = tmp_path / "outside.tar"
    shutil.copy(setup["tar"], outside)
    backup = tmp_path / "backup.tar"
    setup["tar"].rename(backup)
    try:
        setup["tar"].symlink_to(outside)  # the same bytes, reached through a link that leads out
        _one_line_error(client.get(f"/image/{tid}"), 404)
        _one_line_error(client.get(f"/thumb/{tid}"), 404)
    finally:
        setup["tar"].unlink()
        backup.rename(setup["tar"])
    assert client.get(f"/image/{tid}").status_code == 200

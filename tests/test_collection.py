"""Collections past one machine: sources (folders, lists, webdataset tars), Parquet shards + manifest,
resume after kills, the local and Ray engines, and the faiss index built from the shards."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import assert_user_error, run_cli as run, save_tiny_weights
from vitdense import ConfigError, DataError
from vitdense.collection.embed import ExtractorSpec, ShardRows
from vitdense.collection.engines import embed_collection
from vitdense.collection.index import ShardedIndex, build_index, choose_index
from vitdense.collection.shards import Collection, marker_path, read_marker, read_shard, write_shard
from vitdense.collection.sources import ShardSpec
from vitdense.retrieval import DescriptorConfig, embed_images

CFG = DescriptorConfig(load_size=32, stride=8)
HOOK = "VITDENSE_TEST_DIE_ONCE"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    return save_tiny_weights(folder / "tiny.safetensors", depth=2), save_tiny_weights(folder / "other.safetensors",
                                                                                       depth=2, seed=1)


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """n small images of two sizes (smooth gradients + noise), plus nothing else."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        h, w = (40, 48) if i % 3 else (48, 40)
        base = np.linspace(0, 255, w)[None, :, None] * rng.random(3)[None, None, :]
        img = np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
        paths.append(folder / f"img{i:03d}.png")
        Image.fromarray(img).save(paths[-1])
    return paths


def all_rows(root: Path) -> tuple[list[str], np.ndarray]:
    coll = Collection.load(root)
    ids, vecs = [], []
    for name, _ in coll.done_rows():
        shard = read_shard(root, name)
        ids += shard["id"]
        vecs.append(shard["vector"])
    return ids, np.concatenate(vecs)


# ----------------------------------------------------------------------------------- embedding (local)

def test_local_embed_matches_embed_images_and_resumes(tmp_path, weights):
    paths = make_images(tmp_path / "img", 20)
    (tmp_path / "img" / "zz_bad.jpg").write_bytes(b"not an image")
    spec = ExtractorSpec("auto", str(weights[0]), "cpu")
    rep = embed_collection([tmp_path / "img"], tmp_path / "emb", spec, CFG, shard_size=8, num_workers=0,
                           progress=False)
    assert rep.embedded == ["shard-00000", "shard-00001", "shard-00002"] and rep.rows == 20
    assert [r for _, r, _ in rep.timeline] == [8, 8, 4] and {w for _, _, w in rep.timeline} == {os.getpid()}
    times = [t for t, _, _ in rep.timeline]
    assert times == sorted(times) and times[-1] <= rep.seconds
    assert rep.steady_images_per_second == pytest.approx(12 / (times[2] - times[0]))
    assert rep.skipped == [(str((tmp_path / "img" / "zz_bad.jpg").resolve()), "not an image file")]
    ids, vecs = all_rows(tmp_path / "emb")
    assert ids == [str(p.resolve()) for p in paths]  # every row named, no duplicates
    # the same vectors as the in-memory retrieval path computes, image by image
    ref = embed_images(spec.build(), paths, CFG, batch_size=1, progress=False)
    np.testing.assert_allclose(vecs, ref.vectors, atol=1e-5)
    manifest = json.loads((tmp_path / "emb" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["rows"] == 20 and manifest["dim"] == 96
    assert [s["rows"] for s in manifest["shards"]] == [8, 8, 4]
    assert manifest["backbone"]["fingerprint"] and manifest["descriptor"]["load_size"] == 32
    sha = read_shard(tmp_path / "emb", "shard-00000", ["sha256"])["sha256"]
    import hashlib
    assert sha[0] == hashlib.sha256(paths[0].read_bytes()).hexdigest()
    # rerun: nothing to do; new images become a new shard
    again = embed_collection([tmp_path / "img"], tmp_path / "emb", spec, CFG, shard_size=8, num_workers=0,
                             progress=False)
    assert again.embedded == [] and len(again.already_done) == 3
    more = make_images(tmp_path / "img2", 3, seed=5)
    grown = embed_collection([tmp_path / "img", tmp_path / "img2"], tmp_path / "emb", spec, CFG, shard_size=8,
                             num_workers=0, progress=False)
    assert grown.embedded == ["shard-00003"] and grown.rows == 23
    assert all_rows(tmp_path / "emb")[0][-3:] == [str(p.resolve()) for p in more]


WORKER_LOG = "VITDENSE_TEST_WORKER_LOG"


def _log_worker_start(worker_id: int) -> None:
    """DataLoader worker_init_fn: one line per decoding process started."""
    with open(os.environ[WORKER_LOG], "a") as f:
        f.write(f"{os.getpid()} {worker_id}\n")


def test_local_engine_starts_its_decoding_workers_once_and_keeps_the_rows(tmp_path, weights, monkeypatch):
    """--workers 2 over 4 shards (3 of files, one with an unreadable image, and a tar; batches of 2, smaller
    than a worker's share of a shard): the 2 decoding processes start once for the whole run (a loader per
    shard started 2 per shard), batches are embedded in local_lanes' lanes with their torch threads, the
    rows are those of --workers 0 and of embed_images, every shard keeps its own skipped rows, and torch's
    thread count is as it was."""
    import threading

    import torch

    from vitdense.collection import embed as embed_module
    from vitdense.collection.engines import local_lanes

    paths = make_images(tmp_path / "img", 13)
    paths[6].write_bytes(b"not an image")  # in the second shard
    write_tar(tmp_path / "img" / "t.tar", 5)
    real = embed_module.DataLoader

    def counting(*args, **kwargs):
        assert "worker_init_fn" not in kwargs
        return real(*args, worker_init_fn=_log_worker_start, **kwargs)

    calls = []  # (thread, torch threads) of each batch embedded
    real_batch = embed_module.embed_batch

    def recording(*args, **kwargs):
        calls.append((threading.current_thread(), torch.get_num_threads()))
        return real_batch(*args, **kwargs)

    monkeypatch.setattr(embed_module, "DataLoader", counting)
    monkeypatch.setattr(embed_module, "embed_batch", recording)
    monkeypatch.setenv(WORKER_LOG, str(tmp_path / "workers.log"))
    threads = torch.get_num_threads()
    spec = ExtractorSpec("auto", str(weights[0]), "cpu")
    lanes, per_lane = local_lanes("cpu")
    common = dict(shard_size=5, batch_size=2, progress=False)
    two = embed_collection([tmp_path / "img"], tmp_path / "two", spec, CFG, num_workers=2, **common)
    started = (tmp_path / "workers.log").read_text().splitlines()
    assert len(started) == 2 and sorted(line.split()[1] for line in started) == ["0", "1"]
    assert torch.get_num_threads() == threads
    assert len(calls) >= 9 and {n for _, n in calls} == {per_lane}
    assert all(t is not threading.main_thread() for t, _ in calls) == (lanes > 1)
    zero = embed_collection([tmp_path / "img"], tmp_path / "zero", spec, CFG, num_workers=0, **common)
    assert len((tmp_path / "workers.log").read_text().splitlines()) == 2  # no workers with --workers 0
    names = [f"shard-{i:05d}" for i in range(4)]
    assert two.embedded == zero.embedded == names and two.rows == zero.rows == 12 + 5
    assert [r for _, r, _ in two.timeline] == [5, 4, 3, 5]
    bad = str(paths[6].resolve())
    assert two.skipped == zero.skipped == [(bad, "not an image file")]
    assert [read_marker(tmp_path / "two", n)["skipped"] for n in names] == [[], [[bad, "not an image file"]], [], []]
    ids, vecs = all_rows(tmp_path / "two")
    ids0, vecs0 = all_rows(tmp_path / "zero")
    good = [p for i, p in enumerate(paths) if i != 6]
    tar = str((tmp_path / "img" / "t.tar").resolve())
    assert ids == ids0 == [str(p.resolve()) for p in good] + [f"{tar}::{i:09d}.jpg" for i in range(5)]
    np.testing.assert_allclose(vecs, vecs0, atol=1e-6)
    ref = embed_images(spec.build(), good, CFG, batch_size=1, progress=False)
    np.testing.assert_allclose(vecs[:12], ref.vectors, atol=1e-5)


def test_steady_rate_counts_each_worker_from_its_first_finished_shard():
    """Ray's actors start at different times and run side by side: each worker's rate from its own first
    finished shard, summed; nothing to say with fewer than two shards from any worker."""
    from vitdense.collection.engines import EmbedReport

    rep = EmbedReport(Path("."), "ray", timeline=[(5.0, 10, 1), (6.0, 10, 2), (7.0, 10, 1), (8.0, 10, 2),
                                                  (9.0, 10, 1)])
    assert rep.steady_images_per_second == pytest.approx(20 / 4 + 10 / 2)
    assert EmbedReport(Path("."), "local", timeline=[(1.0, 5, 7), (2.0, 5, 8)]).steady_images_per_second == 0


@pytest.mark.slow
def test_killed_run_redoes_only_unfinished_shards(tmp_path, weights):
    """A process dying between a shard's Parquet file and its done-marker (os._exit: no cleanup, as kill -9),
    then a kill -9 at a random moment: each rerun redoes only unfinished shards; every id appears once."""
    make_images(tmp_path / "img", 12)
    cmd = [sys.executable, "-m", "vitdense", "embed", tmp_path / "img", "--out", tmp_path / "emb", "--weights",
           weights[0], "--device", "cpu", "--load-size", 32, "--workers", 0, "--shard-size", 2]
    cmd = [str(c) for c in cmd]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), HOOK: str(tmp_path / "died")}
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 1 and (tmp_path / "died").exists()
    dead = (tmp_path / "died").read_text().split()[1]
    assert (tmp_path / "emb" / f"{dead}.parquet").exists() and not marker_path(tmp_path / "emb", dead).exists()
    done_before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "emb").glob("*.done.json")}
    assert dead == "shard-00000" and not done_before
    # second run: SIGKILL once a shard or two are done (or after it finished: then nothing is pending)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(list((tmp_path / "emb").glob("*.done.json"))) < 2 and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_done = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "emb").glob("*.done.json")}
    assert "shard-00000.done.json" in killed_done  # the shard left half-done by the first run was redone
    third = embed_collection([tmp_path / "img"], tmp_path / "emb", ExtractorSpec("auto", str(weights[0]), "cpu"),
                             CFG, shard_size=2, num_workers=0, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "emb").glob("*.done.json")}
    assert len(after) == 6 and all(after[n] == t for n, t in killed_done.items())  # done shards untouched
    assert len(third.already_done) == len(killed_done) and len(third.embedded) == 6 - len(killed_done)
    ids, _ = all_rows(tmp_path / "emb")
    assert len(ids) == 12 and len(set(ids)) == 12


def test_patch_descriptors_are_the_extractors_tokens_in_float16(tmp_path, weights):
    """--patch-descriptors: each row's patch tokens (h, w, D) in float16 beside the shard, keyed by id, equal
    to the extractor's own tokens of that image (last layer, final LayerNorm, no CLS) to float16 rounding."""
    from vitdense import read_patches
    from vitdense.retrieval import preprocess_image

    paths = make_images(tmp_path / "img", 5)  # 4 × 4 patches at --load-size 32
    wide = np.random.default_rng(3).integers(0, 255, (32, 72, 3), dtype=np.uint8)  # 4 × 9 patches
    paths.append(tmp_path / "img" / "wide.png")
    Image.fromarray(wide).save(paths[-1])
    common = ["--weights", weights[0], "--device", "cpu", "--load-size", 32, "--workers", 0, "--shard-size", 3]
    res = run("embed", tmp_path / "img", "--out", tmp_path / "emb", "--patch-descriptors", *common)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "emb" / "manifest.json").read_text())["patch_descriptors"] is True
    got = {**read_patches(tmp_path / "emb", "shard-00000"), **read_patches(tmp_path / "emb", "shard-00001")}
    assert sorted(got) == sorted(str(p.resolve()) for p in paths)
    ext = ExtractorSpec("auto", str(weights[0]), "cpu").build()
    grids = set()
    for path in paths:
        x = preprocess_image(Image.open(path).convert("RGB"), CFG, ext.mean, ext.std)[None]
        feats = ext.extract(x, [ext.layer_index(-1)], "token", include_cls=True)
        tokens = ext.model.norm(feats.descriptors[ext.layer_index(-1)])[0, 1:].detach().numpy()  # (T, D)
        h, w = feats.num_patches
        mine = got[str(path.resolve())]
        assert mine.dtype == np.float16 and mine.shape == (h, w, tokens.shape[1])
        grids.add((h, w))
        np.testing.assert_allclose(mine.astype(np.float32), tokens.reshape(h, w, -1), rtol=1e-3, atol=2e-3)
    assert grids == {(4, 4), (4, 9)}  # each image keeps its own grid
    # the global vectors are unchanged by keeping the patches
    ids, vecs = all_rows(tmp_path / "emb")
    ref = embed_images(ext, [Path(i) for i in ids], CFG, batch_size=1, progress=False)
    np.testing.assert_allclose(vecs, ref.vectors, atol=1e-5)
    # a rerun without the flag into the same folder is a one-line error, never a mix
    assert_user_error(run("embed", tmp_path / "img", "--out", tmp_path / "emb", *common), "manifest.json",
                      "--patch-descriptors")
    plain = tmp_path / "plain"
    assert run("embed", tmp_path / "img", "--out", plain, *common).exit_code == 0
    with pytest.raises(DataError, match="without --patch-descriptors"):
        read_patches(plain, "shard-00000")


def write_tar(path: Path, n: int, seed: int = 0) -> list[str]:
    """An img2dataset-style webdataset tar: KEY.jpg + KEY.json per sample."""
    rng = np.random.default_rng(seed)
    keys = []
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            key = f"{i:09d}"
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
            for name, data in ((f"{key}.jpg", buf.getvalue()),
                               (f"{key}.json", json.dumps({"caption": f"c{i}"}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            keys.append(key)
    return keys


def test_webdataset_tars_and_truncated_tar(tmp_path, weights):
    write_tar(tmp_path / "00000.tar", 5)
    data = (tmp_path / "00000.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(data[: len(data) // 2])  # truncated mid-way
    (tmp_path / "list.txt").write_text("00000.tar\n00001.tar\n")
    rep = embed_collection([tmp_path / "list.txt"], tmp_path / "emb", ExtractorSpec("auto", str(weights[0]), "cpu"),
                           CFG, num_workers=0, progress=False)
    shard0 = read_shard(tmp_path / "emb", "shard-00000", ["id", "meta"])
    tar0 = str((tmp_path / "00000.tar").resolve())
    assert shard0["id"] == [f"{tar0}::{i:09d}.jpg" for i in range(5)]
    assert json.loads(shard0["meta"][2]) == {"json": json.dumps({"caption": "c2"})}
    shard1 = read_shard(tmp_path / "emb", "shard-00001", ["id"])["id"]
    assert 0 < len(shard1) < 5 and shard1 == [i.replace("00000.tar", "00001.tar") for i in shard0["id"][:len(shard1)]]
    assert len(rep.skipped) == 1 and rep.skipped[0][0].endswith("00001.tar::<truncated>")
    assert "truncated" in rep.skipped[0][1] and rep.rows == 5 + len(shard1)


def test_mismatched_manifest_and_bad_sources_are_one_line_errors(tmp_path, weights):
    make_images(tmp_path / "img", 2)
    common = ["--device", "cpu", "--load-size", 32, "--workers", 0]
    assert run("embed", tmp_path / "img", "--out", tmp_path / "emb", "--weights", weights[0], *common).exit_code == 0
    assert_user_error(run("embed", tmp_path / "img", "--out", tmp_path / "emb", "--weights", weights[1], *common),
                      "manifest.json", "fingerprint")
    assert_user_error(run("embed", tmp_path / "img", "--out", tmp_path / "emb", "--weights", weights[0], *common,
                          "--descriptor", "gem"), "manifest.json", "descriptor: collection 'cls' vs requested 'gem'")
    assert_user_error(run("embed", tmp_path / "nope", "--out", tmp_path / "e2", "--weights", weights[0], *common),
                      "nope")
    assert not (tmp_path / "e2").exists()


# ----------------------------------------------------------------------------------- Ray engine

@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    ray = pytest.importorskip("ray")
    flag = tmp_path_factory.mktemp("hook") / "died"
    flag.write_text("disarmed\n")
    # the hook's variable goes to Ray's workers only, never to this (the driver's) process
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {HOOK: str(flag)}})
    yield flag
    ray.shutdown()


@pytest.mark.slow
def test_ray_engine_same_rows_as_local_and_survives_actor_death(tmp_path, weights, ray_cluster):
    make_images(tmp_path / "img", 24)
    spec = ExtractorSpec("auto", str(weights[0]), "cpu")
    embed_collection([tmp_path / "img"], tmp_path / "local", spec, CFG, shard_size=4, num_workers=0, progress=False)
    ray_cluster.unlink()  # arm: the first actor to finish a shard dies before marking it done
    try:
        embed_collection([tmp_path / "img"], tmp_path / "ray", spec, CFG, engine="ray", shard_size=4, actors=2,
                         progress=False)
    except Exception:  # Ray may give up on the job instead of retrying the dead actor's shard: rerun below
        pass
    assert ray_cluster.exists()  # an actor did die
    rerun = embed_collection([tmp_path / "img"], tmp_path / "ray", spec, CFG, engine="ray", shard_size=4, actors=2,
                             progress=False)
    assert rerun.manifest["complete"] and rerun.rows == 24
    # the timeline comes from the actors (their clocks and process ids), one entry per shard embedded now
    assert sum(r for _, r, _ in rerun.timeline) == rerun.new_rows and len(rerun.timeline) == len(rerun.embedded)
    assert os.getpid() not in {w for _, _, w in rerun.timeline}
    ids_l, vec_l = all_rows(tmp_path / "local")
    ids_r, vec_r = all_rows(tmp_path / "ray")
    assert ids_r == ids_l and len(set(ids_r)) == 24
    np.testing.assert_allclose(vec_r, vec_l, atol=1e-6)


def _session_pids(sid: int) -> list[int]:
    """Processes of session ``sid`` still alive (Linux /proc): what a killed driver left behind."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields after the name: state, ppid, pgrp, session
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.slow
def test_ray_driver_killed_then_rerun_redoes_only_unfinished_shards(tmp_path, weights, ray_cluster):
    """SIGKILL of the `vitdense embed --engine ray` driver once some shards are done, then a rerun (on Ray):
    every id once, the shards done before the kill untouched (their marker and Parquet file not rewritten)."""
    assert ray_cluster.exists()  # the die-once hook disarmed for this Ray's actors
    make_images(tmp_path / "img", 40)
    cmd = [sys.executable, "-m", "vitdense", "embed", tmp_path / "img", "--out", tmp_path / "emb", "--engine", "ray",
           "--actors", 2, "--weights", weights[0], "--device", "cpu", "--load-size", 32, "--workers", 0,
           "--shard-size", 2]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("RAY_ADDRESS", None)  # the driver starts its own local Ray (4 logical CPUs for 2 actors)
    # a session of its own, so what the dead driver leaves behind (Ray's raylet, GCS, actors) can be ended
    proc = subprocess.Popen([str(c) for c in cmd], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 150
        while time.time() < deadline and proc.poll() is None and \
                len(list((tmp_path / "emb").glob("*.done.json"))) < 3:
            time.sleep(0.01)
        assert proc.poll() is None, "the driver ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        deadline = time.time() + 20
        while time.time() < deadline and _session_pids(proc.pid):  # Ray's processes share the driver's fate
            time.sleep(0.2)
        for pid in _session_pids(proc.pid):  # any still there after 20 s: end them (ours, by id)
            os.kill(pid, signal.SIGKILL)
    killed = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "emb").glob("shard-*")
              if p.name.endswith((".done.json", ".parquet"))}
    done = {n.removesuffix(".done.json") for n in killed if n.endswith(".done.json")}
    assert 3 <= len(done) < 20
    rerun = embed_collection([tmp_path / "img"], tmp_path / "emb", ExtractorSpec("auto", str(weights[0]), "cpu"),
                             CFG, engine="ray", shard_size=2, actors=2, progress=False)
    assert sorted(rerun.already_done) == sorted(done) and len(rerun.embedded) == 20 - len(done)
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "emb").glob("shard-*")}
    for name in done:  # done shards untouched
        for f in (f"{name}.done.json", f"{name}.parquet"):
            assert after[f] == killed[f], f
    ids, vecs = all_rows(tmp_path / "emb")
    assert sorted(ids) == sorted(str(p.resolve()) for p in (tmp_path / "img").iterdir()) and len(set(ids)) == 40
    ref = embed_images(ExtractorSpec("auto", str(weights[0]), "cpu").build(), ids[:4], CFG, batch_size=1,
                       progress=False)
    np.testing.assert_allclose(vecs[:4], ref.vectors, atol=1e-5)


# ----------------------------------------------------------------------------------- index from shards

def synthetic_collection(root: Path, shards: int = 4, per: int = 300, dim: int = 32, seed: int = 0,
                         spread: float = 0.4) -> np.ndarray:
    """An embeddings folder of clustered unit vectors (16 centres, Gaussian ``spread`` around them) written as
    shards; returns all vectors (N, dim)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(16, dim))
    specs = [ShardSpec(f"shard-{s:05d}", "files", tuple(f"/data/{s}/{j}.jpg" for j in range(per)))
             for s in range(shards)]
    (root / "inputs").mkdir(parents=True)
    out = []
    for spec in specs:
        (root / "inputs" / f"{spec.name}.txt").write_text("\n".join(spec.items) + "\n")
        v = centers[rng.integers(0, 16, per)] + spread * rng.normal(size=(per, dim))
        v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
        write_shard(root, spec.name, ShardRows(list(spec.items), [""] * per, [""] * per, v), 0.0)
        out.append(v)
    Collection(root, {"fingerprint": "x", "stride": 8, "model": "m"}, DescriptorConfig(), dim, specs).write_manifest()
    return np.concatenate(out)


def test_manifest_records_the_sources_and_keeps_old_manifests_readable(tmp_path, monkeypatch):
    """The manifest records each source as given (absolute) and the folder of what it named (a list's
    files, not the list's own folder); reruns add sources or widen a source's folder; a manifest written
    before sources were recorded loads with none and keeps recording none."""
    from vitdense.collection.sources import record_sources

    backbone = {"fingerprint": "x", "stride": 8, "model": "m"}
    base = tmp_path.resolve()
    make_images(base / "photos" / "a", 2)
    listed = make_images(base / "elsewhere" / "deep", 2, seed=1)
    (base / "lists").mkdir()
    (base / "lists" / "more.txt").write_text("".join(f"{p}\n" for p in listed))
    (base / "tars").mkdir()
    write_tar(base / "tars" / "00000.tar", 2)
    monkeypatch.chdir(base)
    files, tars, records = record_sources(["photos", "lists/more.txt", "tars/00000.tar"])
    assert len(files) == 4 and tars == [str(base / "tars" / "00000.tar")]
    assert records == [{"path": str(base / "photos"), "folder": str(base / "photos" / "a")},
                       {"path": str(base / "lists" / "more.txt"), "folder": str(base / "elsewhere" / "deep")},
                       {"path": str(base / "tars" / "00000.tar"), "folder": str(base / "tars")}]
    emb = base / "emb"
    Collection.open_or_create(emb, files, tars, backbone, DescriptorConfig(), 8, 10, sources=records)
    assert json.loads((emb / "manifest.json").read_text())["sources"] == records
    assert Collection.load(emb).sources == records
    # a rerun: the photos folder gained a subfolder (its folder widens), and a new source is added
    make_images(base / "photos" / "b", 1, seed=2)
    make_images(base / "other", 1, seed=3)
    files, tars, more = record_sources(["photos", "other"])
    coll = Collection.open_or_create(emb, files, tars, backbone, DescriptorConfig(), 8, 10, sources=more)
    assert coll.sources == [{"path": str(base / "photos"), "folder": str(base / "photos")}, *records[1:],
                            {"path": str(base / "other"), "folder": str(base / "other")}]
    assert Collection.load(emb).sources == coll.sources
    # new shards planned without their sources: the collection's are no longer known
    coll = Collection.open_or_create(emb, [str(base / "elsewhere" / "new.png")], [], backbone, DescriptorConfig(),
                                     8, 10)
    assert coll.sources is None and "sources" not in json.loads((emb / "manifest.json").read_text())
    # a manifest from before: no field, loaded as unknown, still unknown after a rerun that names sources
    old = base / "old"
    Collection.open_or_create(old, files, tars, backbone, DescriptorConfig(), 8, 10, sources=more)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["sources"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert Collection.load(old).sources is None
    files, tars, records = record_sources(["lists/more.txt"])
    assert Collection.open_or_create(old, files, tars, backbone, DescriptorConfig(), 8, 10,
                                     sources=records).sources is None
    assert "sources" not in json.loads((old / "manifest.json").read_text())


def test_choose_index_follows_count_dim_and_budget():
    g = 1024 ** 3
    assert choose_index(50_000, 384, 4 * g).kind == "flat"
    assert choose_index(1_000_000, 384, 4 * g).factory == "IVF16384,Flat"  # 1.4 GiB raw fits 4 GiB; ≥ 39/list
    assert choose_index(5_000_000, 384, 8 * g).factory == "IVF65536,Flat"  # faiss' guideline for 1-10 M
    pq = choose_index(10_000_000, 384, 64 * g, "ivfpq")
    assert pq.kind == "opq-ivfhnsw-pq" and pq.factory == "OPQ96,IVF131072_HNSW32,PQ96" and "HNSW" in pq.reason
    # 1 GiB cannot hold 39 training points for each of 131072 lists (7.3 GiB): fewer lists, sample in budget
    tight = choose_index(10_000_000, 384, 1 * g)
    assert tight.factory == "OPQ96,IVF4096_HNSW32,PQ96" and tight.n_train * 384 * 4 <= g / 2
    assert tight.n_train >= 39 * tight.nlist
    # IVF-Flat only when the raw vectors fit beside the build's own needs (the process, one shard)
    assert choose_index(500_000, 384, 2 * g, shard_rows=50_000).kind == "ivfflat"
    assert choose_index(1_300_000, 384, 2 * g).kind == "ivfpq"  # 1.86 GiB raw fit 2 GiB, not beside 0.3 GiB
    assert choose_index(400_000, 384, 1 * g, shard_rows=400_000).kind == "ivfpq"  # 0.57 GiB + 3 shards' copies
    small = choose_index(10_000_000, 384, 256 * 1024 ** 2)  # 96+8 B per vector no longer fits: fewer bytes
    assert small.m < 96 and 10_000_000 * (small.m + 8) <= 256 * 1024 ** 2
    with pytest.raises(ConfigError, match="--memory-budget"):
        build_index("x", "y", "lots")


def test_sharded_on_disk_index_equals_in_memory_index_and_resumes_per_shard(tmp_path):
    import faiss

    vectors = synthetic_collection(tmp_path / "emb")
    meta = build_index(tmp_path / "emb", tmp_path / "idx", "64M", index_type="ivfflat", nlist=8, nprobe=3,
                       progress=False)
    assert meta["choice"]["factory"] == "IVF8,Flat" and meta["count"] == 1200
    assert sorted(p.name for p in (tmp_path / "idx").glob("merged-*.ivfdata")) == ["merged-1.ivfdata"]
    idx = ShardedIndex(tmp_path / "idx")
    queries = vectors[[5, 400, 1100]] + 0.01
    # one index built in memory from the same vectors (same trained quantizer), same nprobe
    mem = faiss.read_index(str(tmp_path / "idx" / "trained.index"))
    mem.add(vectors)
    mem.nprobe = 3
    _, want = mem.search(queries.astype(np.float32), 10)
    idx.rerank = 0
    _, got = idx.search(queries.astype(np.float32), 10)
    np.testing.assert_array_equal(got, want)
    # with re-ranking and every list probed: exactly brute force
    faiss.extract_index_ivf(idx.index).nprobe, idx.rerank = 8, 50
    scores, got = idx.search(queries.astype(np.float32), 5)
    exact = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(got, exact)
    assert idx.ids(got[1])[0] == f"/data/{exact[1, 0] // 300}/{exact[1, 0] % 300}.jpg"
    # deleting one shard's index file rebuilds only that shard (no retraining), then merges again
    (tmp_path / "idx" / "shards" / "shard-00002.index").unlink()
    again = build_index(tmp_path / "emb", tmp_path / "idx", "64M", index_type="ivfflat", nlist=8, nprobe=3,
                        progress=False)
    assert again["stages"]["shards_added"] == ["shard-00002"] and not again["stages"]["trained_now"]
    assert sorted(p.name for p in (tmp_path / "idx").glob("merged-*.ivfdata")) == ["merged-2.ivfdata"]
    idx2 = ShardedIndex(tmp_path / "idx")
    idx2.rerank = 0
    np.testing.assert_array_equal(idx2.search(queries.astype(np.float32), 10)[1], want)


def test_image_index_load_opens_a_sharded_index(tmp_path):
    """ImageIndex.load (and open_index) on a folder built from shards gives the ShardedIndex: memory-mapped,
    re-ranked from the shards' vectors, results named by the collection's ids."""
    from vitdense import ImageIndex, open_index

    vectors = synthetic_collection(tmp_path / "emb", shards=2, per=150, dim=16)
    build_index(tmp_path / "emb", tmp_path / "idx", "64M", index_type="ivfflat", nlist=4, nprobe=4, progress=False)
    idx = ImageIndex.load(tmp_path / "idx")
    assert isinstance(idx, ShardedIndex) and isinstance(open_index(tmp_path / "idx"), ShardedIndex)
    assert idx.descriptor == DescriptorConfig() and idx.backbone["fingerprint"] == "x"
    scores, got = idx.search(vectors[[7, 200]], 3)
    exact = np.argsort(-(vectors[[7, 200]] @ vectors.T), axis=1, kind="stable")[:, :3]  # every list probed
    np.testing.assert_array_equal(got, exact)
    np.testing.assert_allclose(scores, np.take_along_axis(vectors[[7, 200]] @ vectors.T, exact, 1), atol=1e-5)
    assert idx.ids(got[1]) == [f"/data/{g // 150}/{g % 150}.jpg" for g in exact[1]]
    assert idx.ids(np.array([-1])) == [None]
    from vitdense.serve.service import open_index as serve_open  # `vitdense serve` opens it too, reading no id

    snap = serve_open(tmp_path / "idx")
    assert len(snap) == 300 and snap.generation == 1 and snap.collection == "/data" and not snap.ids.items
    assert [h[:2] for h in snap.search(vectors[200], 3)] == [(pytest.approx(float(s), abs=1e-5), int(g))
                                                             for s, g in zip(scores[1], got[1])]


def test_sharded_ids_keep_a_bounded_lru_of_shards_and_stay_right(tmp_path, monkeypatch):
    """ShardedIndex.ids (what `vitdense search` names its results with) keeps the ids of the last ID_SHARDS
    shards, not of every shard it ever read: results spanning more shards than that are still named right,
    each shard read once per call, and the cache never holds more than the bound."""
    from vitdense.collection import index as index_module

    n_shards, per = 70, 3  # more shards than the default bound
    assert index_module.ID_SHARDS == 64
    synthetic_collection(tmp_path / "emb", shards=n_shards, per=per, dim=8)
    build_index(tmp_path / "emb", tmp_path / "idx", "64M", index_type="flat", progress=False)
    reads: list[str] = []
    real = index_module.read_shard
    monkeypatch.setattr(index_module, "read_shard",
                        lambda root, name, cols: reads.append(name) or real(root, name, cols))

    def names(rows):
        return [None if g < 0 else f"/data/{g // per}/{g % per}.jpg" for g in rows]

    rows = np.random.default_rng(0).permutation(n_shards * per)  # score order: shards interleaved
    rows = np.concatenate([rows, [-1]])
    idx = ShardedIndex(tmp_path / "idx")
    assert idx.ids(rows) == names(rows)
    assert len(reads) == n_shards  # each shard once, though they do not fit the cache
    assert len(idx.id_cache.items) == 64
    assert idx.ids(rows[:5]) == names(rows[:5])
    small = ShardedIndex(tmp_path / "idx", id_shards=3)
    for g in rows[:40]:  # one row at a time, shards coming and going
        assert small.ids(np.array([g])) == names([g])
        assert len(small.id_cache.items) <= 3
    assert small.ids(rows.reshape(1, -1)) == names(rows)  # (Q, K) as search returns them
    assert len(small.id_cache.items) == 3


def test_ivfpq_recall_with_reranking_and_index_json(tmp_path):
    import faiss

    faiss.omp_set_num_threads(1)  # shared cores: OpenMP spinning makes k-means slower, not faster
    synthetic_collection(tmp_path / "emb", shards=3, per=400, dim=16)
    meta = build_index(tmp_path / "emb", tmp_path / "idx", "64M", index_type="ivfpq", nlist=8, nprobe=8,
                       rerank=120, progress=False)
    assert meta["choice"]["factory"] == "IVF8,PQ4x4"
    rec = meta["recall"]
    assert rec["queries"] == 120 and rec["recall_at_10_reranked"] >= 0.95
    assert rec["recall_at_10_reranked"] > rec["recall_at_10"]
    assert set(meta["stages"]["seconds"]) == {"choose", "train", "add", "merge", "evaluate"}
    assert meta["peak_rss"] > 0 and meta["choice"]["reason"]
    saved = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert saved["recall"] == rec


def test_index_from_incomplete_embeddings_is_an_error(tmp_path):
    synthetic_collection(tmp_path / "emb", shards=2, per=50)
    marker_path(tmp_path / "emb", "shard-00001").unlink()
    with pytest.raises(DataError, match="1 of 2 shard"):
        build_index(tmp_path / "emb", tmp_path / "idx", progress=False)


def test_cli_embed_index_search_names_ids(tmp_path, weights):
    paths = make_images(tmp_path / "img", 10)
    common = ["--device", "cpu", "--load-size", 32, "--workers", 0]
    res = run("embed", tmp_path / "img", "--out", tmp_path / "emb", "--weights", weights[0], "--shard-size", 4,
              *common)
    assert res.exit_code == 0 and "10 row(s) in 3 shard(s)" in res.output
    res = run("index", "--embeddings", tmp_path / "emb", "--out", tmp_path / "idx", "--memory-budget", "64M")
    assert res.exit_code == 0 and "Flat" in res.output, res.output
    res = run("search", paths[3], "--index", tmp_path / "idx", "-k", 3, "--out", tmp_path / "found", "--device", "cpu")
    assert res.exit_code == 0, res.output
    hits = json.loads((tmp_path / "found" / "results.json").read_text())["queries"][0]["results"]
    assert hits[0]["path"] == str(paths[3].resolve()) and hits[0]["score"] == pytest.approx(1, abs=1e-4)
    assert_user_error(run("index", tmp_path / "img", "--embeddings", tmp_path / "emb", "--out", tmp_path / "i2"),
                      "either IMG_DIR or --embeddings")


def test_exact_topk_streams_shards_in_blocks_like_one_sort(tmp_path, monkeypatch):
    from vitdense.collection import index as module

    rng = np.random.default_rng(3)
    parts = [rng.normal(size=(rows, 8)).astype(np.float32) for rows in (5, 23, 1, 17)]
    parts[2][0] = parts[0][1]  # a tie across shards: the lower id comes first
    paths = []
    for i, part in enumerate(parts):
        paths.append(tmp_path / f"{i}.npy")
        np.save(paths[-1], part)
    offsets = np.cumsum([0] + [len(p) for p in parts])
    queries = np.concatenate([rng.normal(size=(3, 8)), parts[0][1:2]]).astype(np.float32)
    monkeypatch.setattr(module, "EXACT_BLOCK", 4)  # several blocks per shard
    got = module._exact_topk(paths, offsets, queries, 7)
    want = np.argsort(-(queries @ np.concatenate(parts).T), axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(got, want)


BUILD_IN_CHILD = """
import json, runpy, sys
sys.argv = ["vitdense", "index", "--embeddings", sys.argv[1], "--out", sys.argv[2], "--memory-budget", sys.argv[3],
            "--index-type", "ivfflat"]
try:
    runpy.run_module("vitdense", run_name="__main__")  # `vitdense index --embeddings`, as a user runs it
except SystemExit as stop:
    assert not stop.code, stop.code
hwm = [int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
print(json.dumps({"hwm": hwm, "torch": "torch" in sys.modules}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM needs Linux /proc")
def test_index_build_peak_memory_stays_within_the_budget(tmp_path):
    """`vitdense index --embeddings` of 100k × 64-d vectors (24 MiB) under a 384 MiB budget, in a fresh process
    whose own high-water mark (VmHWM) is the measure: the build must not import torch (~0.5 GB alone), and train / add / merge /
    evaluate must each hold no more than a shard or a sample at a time."""
    import vitdense

    synthetic_collection(tmp_path / "emb", shards=10, per=10_000, dim=64)
    budget = 384 * 1024 ** 2
    env = {**os.environ, "PYTHONPATH": str(Path(vitdense.__file__).resolve().parents[1])}
    res = subprocess.run([sys.executable, "-c", BUILD_IN_CHILD, str(tmp_path / "emb"), str(tmp_path / "idx"),
                          str(budget)], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert not got["torch"]
    assert got["hwm"] <= budget, f"peak RSS {got['hwm'] / 2**20:.0f} MiB over the {budget / 2**20:.0f} MiB budget"
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["within_budget"] and meta["peak_rss"] <= got["hwm"]
    assert set(meta["stages"]["peak_rss"]) == {"train", "add", "merge", "evaluate"}
    assert meta["count"] == 100_000 and meta["choice"]["kind"] == "ivfflat"
    assert meta["recall"]["recall_at_10_reranked"] >= 0.8  # searchable (equality: the test above)


def _objective(vectors: np.ndarray, centroids: np.ndarray) -> float:
    """Mean inner product of each vector with its best centroid (what spherical k-means maximises)."""
    return float((vectors @ centroids.T).max(1).mean())


def test_two_level_kmeans_is_as_good_as_one_kmeans_and_fills_the_lists():
    """coarse_centroids: nlist unit centroids from √nlist clusters split in proportion to their points; its
    objective is within a hair of faiss' one-level k-means and far above centroids drawn at random."""
    import faiss

    from vitdense.collection.index import _split_lists, coarse_centroids

    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(40, 24))
    x = centres[rng.integers(0, 40, 6000)] + 0.5 * rng.normal(size=(6000, 24))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    two = coarse_centroids(x.copy(), 100, seed=0)
    assert two.shape == (100, 24) and len(np.unique(two.round(5), axis=0)) == 100
    np.testing.assert_allclose(np.linalg.norm(two, axis=1), 1, atol=1e-5)
    one = faiss.Kmeans(24, 100, niter=25, seed=0, spherical=True)
    one.train(x)
    random = x[rng.choice(len(x), 100, replace=False)]
    assert _objective(x, two) >= _objective(x, one.centroids) - 0.01
    assert _objective(x, two) > _objective(x, random) + 0.02
    # the split: proportional, never more lists than points, empty clusters get none
    assert _split_lists(10, np.array([50, 30, 0, 15, 5])).tolist() == [5, 3, 0, 2, 0]  # largest remainder
    assert _split_lists(10, np.array([2, 100])).tolist() == [0, 10]
    assert _split_lists(7, np.array([1, 1, 1])).tolist() == [1, 1, 1]  # fewer points than lists: all it can


@pytest.mark.parametrize("factory", ["IVF64,Flat", "OPQ8,IVF64_HNSW32,PQ8"])
def test_many_lists_train_in_two_levels_in_build_index(tmp_path, monkeypatch, factory):
    """From TWO_LEVEL_FROM lists on, build_index trains the lists by two-level k-means (OPQ first, the lists
    in the rotated space) and faiss trains only the codes; recall with every list probed and re-ranking is
    exact, and index.json says how the lists were trained."""
    import faiss

    from vitdense.collection import index as index_module

    faiss.omp_set_num_threads(1)
    vectors = synthetic_collection(tmp_path / "emb", shards=4, per=1000, dim=32)
    monkeypatch.setattr(index_module, "TWO_LEVEL_FROM", 32)
    real = index_module.choose_index

    def forced(*args, **kwargs):  # the OPQ + HNSW form is chosen from 10 M vectors on: force it here
        c = real(*args, **kwargs)
        return index_module.IndexChoice(c.kind if factory.startswith("IVF") else "opq-ivfhnsw-pq", factory, 64,
                                         0 if factory.startswith("IVF") else 8, 64, 3000, c.reason)

    monkeypatch.setattr(index_module, "choose_index", forced)
    meta = build_index(tmp_path / "emb", tmp_path / "idx", "64M", index_type="ivfflat" if "Flat" in factory
                       else "ivfpq", rerank=400, progress=False)  # 8-bit PQ on 3000 points: coarse codes
    assert meta["coarse_training"] == "two-level k-means (8 clusters, then 64 lists)"
    # each shard's file keeps its lists, not a copy of the trained quantizer (~100 MB a shard at 65536 lists)
    shard = faiss.read_index(str(tmp_path / "idx" / "shards" / "shard-00001.index"))
    shard_ivf = faiss.extract_index_ivf(shard)
    assert shard_ivf.quantizer.ntotal == 0 and shard_ivf.ntotal == 1000
    opened = ShardedIndex(tmp_path / "idx")  # kept in a name: the lists belong to its index
    lists = faiss.extract_index_ivf(opened.index).invlists
    ivf_sizes = [lists.list_size(i) for i in range(64)]
    assert meta["list_imbalance"] == pytest.approx(64 * np.square(ivf_sizes).sum() / 4000 ** 2, rel=1e-3)
    trained = faiss.read_index(str(tmp_path / "idx" / "trained.index"))
    ivf = faiss.extract_index_ivf(trained)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1, atol=1e-5)  # spherical, as faiss' IP
    rotated = vectors
    if isinstance(trained, faiss.IndexPreTransform):  # the lists live in OPQ's rotated space
        rotated = trained.chain.at(0).apply(vectors)
    random = rotated[np.random.default_rng(0).choice(len(rotated), 64, replace=False)]
    assert _objective(rotated, centroids) > _objective(rotated, random) + 0.02
    assert meta["recall"]["recall_at_10_reranked"] == 1.0
    idx = ShardedIndex(tmp_path / "idx")
    faiss.extract_index_ivf(idx.index).nprobe = 64
    queries = vectors[[3, 1500, 3999]]
    exact = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(idx.search(queries, 5)[1], exact)


def test_collection_decodes_images_as_the_shared_loader_reads_files():
    """A phone photo (EXIF orientation 6) and a 16-bit scan are embedded as every command sees them: upright,
    scaled by the bit depth (not clipped white)."""
    from vitdense.collection.embed import decode_image

    stored = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, format="PNG", exif=exif)
    np.testing.assert_array_equal(np.asarray(decode_image(buf.getvalue())), np.rot90(stored, -1))
    ramp = np.tile(np.linspace(0, 65535, 8).round().astype(np.uint16), (2, 1))
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    expected = np.round(ramp * (255 / 65535)).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(decode_image(buf.getvalue())), np.repeat(expected[:, :, None], 3, 2))


def test_set_nprobe_makes_an_hnsw_quantizer_find_the_nearest_lists():
    """With faiss' default efSearch (16) an HNSW coarse quantizer asked for 128 lists misses about a quarter
    of the 128 nearest; set_nprobe searches 2·nprobe deep, so the lists probed are the nearest ones."""
    import faiss

    from vitdense.collection.index import set_nprobe

    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    centroids = rng.normal(size=(4096, 32)).astype(np.float32)
    queries = rng.normal(size=(40, 32)).astype(np.float32)
    index = faiss.index_factory(32, "IVF4096_HNSW32,Flat")
    ivf = faiss.extract_index_ivf(index)
    ivf.quantizer.add(centroids)
    index.is_trained = True
    exact = faiss.IndexFlatL2(32)
    exact.add(centroids)
    want = exact.search(queries, 128)[1]

    def overlap():
        got = faiss.downcast_index(ivf.quantizer).search(queries, ivf.nprobe)[1]
        return np.mean([len(set(a) & set(b)) / 128 for a, b in zip(got, want)])

    ivf.nprobe = 128
    assert overlap() < 0.9  # faiss' default depth
    set_nprobe(index, 128)
    assert ivf.nprobe == 128 and faiss.downcast_index(ivf.quantizer).hnsw.efSearch == 256
    assert overlap() > 0.98
    set_nprobe(index, 10**6)  # never more lists than there are
    assert ivf.nprobe == 4096


def test_added_vectors_land_in_their_nearest_list_with_an_hnsw_quantizer(tmp_path):
    """An HNSW coarse quantizer searched at faiss' default depth puts ~1 % of these vectors in a list that is
    not their nearest (~2 % at 10 M in 65536 lists; probing the nearest lists never finds them: recall@10 stayed at 0.92); a
    shard added by the build puts (nearly) every vector in its nearest list."""
    import faiss

    from vitdense.collection.index import _add_shard

    faiss.omp_set_num_threads(1)
    vectors = synthetic_collection(tmp_path / "emb", shards=2, per=10_000, dim=128, spread=1.0)
    centroids = vectors[np.random.default_rng(1).choice(len(vectors), 4096, replace=False)]
    index = faiss.index_factory(128, "IVF4096_HNSW32,Flat", faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.quantizer.add(centroids)
    index.is_trained = True
    (tmp_path / "idx" / "shards").mkdir(parents=True)
    (tmp_path / "idx" / "vectors").mkdir()
    faiss.write_index(index, str(tmp_path / "idx" / "trained.index"))
    exact = faiss.IndexFlatIP(128)
    exact.add(centroids)
    nearest = exact.search(vectors, 1)[1].ravel()

    def placed(ivf_index) -> np.ndarray:
        lists = np.full(len(vectors), -1)
        inv = ivf_index.invlists
        for i in range(ivf_index.nlist):
            size = inv.list_size(i)
            if size:
                lists[faiss.rev_swig_ptr(inv.get_ids(i), size).copy()] = i
        return lists

    default = faiss.read_index(str(tmp_path / "idx" / "trained.index"))  # faiss' default depth
    default.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64))
    assert np.mean(placed(faiss.extract_index_ivf(default)) == nearest) < 0.993
    for s in range(2):
        _add_shard(str(tmp_path / "emb"), str(tmp_path / "idx"), f"shard-{s:05d}", s * 10_000)
    lists = np.full(len(vectors), -1)
    for s in range(2):
        shard = faiss.read_index(str(tmp_path / "idx" / "shards" / f"shard-{s:05d}.index"))
        got = placed(faiss.extract_index_ivf(shard))
        lists[got >= 0] = got[got >= 0]
    assert (lists >= 0).all() and np.mean(lists == nearest) > 0.999

"""Global descriptors, the on-disk index (incremental, resumable, backbone checks), faiss search, and the
retrieval evaluations (Revisited mAP, weighted k-NN, copy detection)."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_user_error, run_cli as run, save_tiny_weights, tiny_extractor
from vitdense import ConfigError, DataError
from vitdense.retrieval import (DescriptorConfig, FaissConfig, ImageIndex, build_faiss, embed_images,
                                faiss_search, gem, global_descriptors, update_index)
from vitdense.retrieval_eval import (average_precision, compute_map, copy_detection_scores, knn_accuracy,
                                     knn_classify, load_revisited_gnd, revisited_map, strong_augment)


# ----------------------------------------------------------------------------------- descriptors

def test_cls_and_gem_descriptors_equal_timm_forward():
    """At the native grid (stride = patch, 64 px), our CLS/GeM equal the ones computed from timm's own
    forward_features (which applies the final LayerNorm), pooled by hand here."""
    ext = tiny_extractor(stride=8)
    batch = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = ext.model.forward_features(batch)  # (2, 1 + 64, 96)
    cls = tokens[:, 0] / tokens[:, 0].norm(dim=1, keepdim=True)
    patches = tokens[:, 1:].clamp(min=1e-6)
    gem3 = (patches ** 3).mean(dim=1) ** (1 / 3)
    both = torch.cat([tokens[:, 0], (patches ** 4).mean(dim=1) ** 0.25], dim=1)
    torch.testing.assert_close(global_descriptors(ext, batch, DescriptorConfig("cls")), cls, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(global_descriptors(ext, batch, DescriptorConfig("gem", gem_p=3)),
                               gem3 / gem3.norm(dim=1, keepdim=True), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(global_descriptors(ext, batch, DescriptorConfig("both")),
                               both / both.norm(dim=1, keepdim=True), atol=1e-5, rtol=1e-4)


def test_gem_p1_is_mean_of_positive_part():
    x = torch.randn(3, 10, 5)
    torch.testing.assert_close(gem(x, p=1.0), x.clamp(min=1e-6).mean(dim=1))


def test_multiscale_averages_three_scales():
    ext = tiny_extractor(stride=8)
    batch = torch.randn(1, 3, 64, 64)
    got = global_descriptors(ext, batch, DescriptorConfig("cls", multiscale=True))
    total = 0
    for scale in (1.0, 2 ** -0.5, 0.5):  # DINO's utils.multi_scale: bilinear resize by a scale factor
        inp = torch.nn.functional.interpolate(batch, scale_factor=scale, mode="bilinear", align_corners=False)
        assert inp.shape[-1] == {1.0: 64, 0.5: 32}.get(scale, 45)
        feats = ext.extract(inp, [-1], "token", include_cls=True).descriptors[-1]
        total = total + ext.model.norm(feats)[:, 0]
    torch.testing.assert_close(got, total / total.norm(dim=1, keepdim=True), atol=1e-5, rtol=1e-4)


def test_embed_images_groups_sizes_and_skips_unreadable(tmp_path, photos):
    ext = tiny_extractor(stride=8)
    Image.fromarray(photos["chelsea"]).save(tmp_path / "a.jpg")
    Image.fromarray(photos["coffee"][:200, :200]).save(tmp_path / "b.png")  # another aspect ratio
    (tmp_path / "c.jpg").write_bytes(b"not an image")
    cfg = DescriptorConfig("gem", load_size=48)
    res = embed_images(ext, [tmp_path / "a.jpg", tmp_path / "c.jpg", tmp_path / "b.png"], cfg, batch_size=3,
                       progress=False)
    assert res.indices.tolist() == [0, 2]
    assert res.skipped[0][0] == 1 and "not an image" in res.skipped[0][1]
    single = embed_images(ext, [tmp_path / "b.png"], cfg, progress=False).vectors
    np.testing.assert_allclose(res.vectors[1], single[0], atol=1e-5)
    # a worker process loads the images: same result
    workers = embed_images(ext, [tmp_path / "a.jpg", tmp_path / "c.jpg", tmp_path / "b.png"], cfg, batch_size=2,
                           num_workers=1, progress=False)
    assert workers.indices.tolist() == [0, 2] and workers.skipped == res.skipped
    np.testing.assert_allclose(workers.vectors, res.vectors, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(res.vectors, axis=1), 1, atol=1e-5)


# ----------------------------------------------------------------------------------- faiss

def _clustered(n, dim, rng, centers=64):
    c = rng.normal(size=(centers, dim))
    x = c[rng.integers(0, centers, n)] + 0.5 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_flat_search_is_exact_and_ivfpq_rerank_recovers_recall():
    rng = np.random.default_rng(0)
    db, q = _clustered(4000, 64, rng), _clustered(50, 64, rng)
    exact = np.argsort(-(q @ db.T), axis=1)[:, :10]
    scores, ids = faiss_search(build_faiss(db, FaissConfig("flat")), q, 10)
    np.testing.assert_array_equal(ids, exact)
    ivf = build_faiss(db, FaissConfig("ivfpq", nlist=32, m=16, nprobe=16))
    _, approx = faiss_search(ivf, q, 10)
    s_rr, rr = faiss_search(ivf, q, 10, vectors=db, rerank=200)
    recall = lambda got: np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact)])
    assert recall(rr) >= 0.9 and recall(rr) >= recall(approx)
    np.testing.assert_allclose(s_rr, np.take_along_axis(q @ db.T, rr, axis=1), atol=1e-5)  # exact scores


# ----------------------------------------------------------------------------------- index folder

def _write_photos(folder, photos, names, size=96):
    folder.mkdir(exist_ok=True)
    for name in names:
        img = Image.fromarray(photos[name])
        img.thumbnail((size * 2, size * 2))
        img.save(folder / f"{name}.png")
    return sorted(folder.iterdir())


CFG = DescriptorConfig("gem", load_size=48, stride=8)


def test_incremental_indexing_embeds_only_new_and_changed(tmp_path, photos):
    ext = tiny_extractor(stride=8)
    imgs, root = tmp_path / "imgs", tmp_path / "idx"
    paths = _write_photos(imgs, photos, ["chelsea", "coffee", "astronaut"])
    idx, plan = update_index(root, paths, ext, CFG, FaissConfig(), progress=False)
    assert len(plan.embed) == 3 and len(idx.entries) == 3
    _, plan = update_index(root, paths, ext, CFG, FaissConfig(), progress=False)
    assert len(plan.embed) == 0 and len(plan.keep) == 3

    paths = _write_photos(imgs, photos, ["rocket"])  # a new file
    os.utime(imgs / "coffee.png", ns=(1, 1))  # touched, same content: not re-embedded
    Image.fromarray(photos["astronaut"][::-1].copy()).resize((96, 96)).save(imgs / "astronaut.png")  # changed
    (imgs / "chelsea.png").unlink()  # removed
    paths = sorted(imgs.iterdir())
    idx, plan = update_index(root, paths, ext, CFG, FaissConfig(), progress=False)
    assert sorted(os.path.basename(e.path) for e in plan.embed) == ["astronaut.png", "rocket.png"]
    assert [os.path.basename(p) for p in plan.changed] == ["astronaut.png"]
    assert [os.path.basename(p) for p in plan.removed] == ["chelsea.png"]
    loaded = ImageIndex.load(root)
    assert sorted(os.path.basename(e.path) for e in loaded.entries) == ["astronaut.png", "coffee.png", "rocket.png"]
    fresh = embed_images(ext, [e.path for e in loaded.entries], CFG, progress=False).vectors
    np.testing.assert_allclose(np.asarray(loaded.vectors), fresh, atol=1e-5)  # every row is its file's vector
    scores, ids = loaded.search(fresh, 1)
    assert ids[:, 0].tolist() == [0, 1, 2]
    assert loaded.ids(np.array([2, -1, 0])) == [loaded.entries[2].path, None, loaded.entries[0].path]
    assert sorted(p.name for p in root.iterdir()) == ["faiss-3.index", "index.json", "vectors-3.npy"]


def test_interrupted_indexing_resumes(tmp_path, photos, monkeypatch):
    import vitdense.retrieval as retrieval

    ext = tiny_extractor(stride=8)
    paths = _write_photos(tmp_path / "imgs", photos, ["chelsea", "coffee", "astronaut", "rocket"])
    real, calls = retrieval.global_descriptors, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(retrieval, "global_descriptors", flaky)
    with pytest.raises(KeyboardInterrupt):
        update_index(tmp_path / "idx", paths, ext, CFG, FaissConfig(), batch_size=1, progress=False,
                     checkpoint_every=1)
    partial = ImageIndex.load(tmp_path / "idx")
    assert not partial.complete and len(partial.entries) == 2
    with pytest.raises(DataError, match="incomplete"):
        partial.search(np.zeros((1, 96), np.float32))
    monkeypatch.setattr(retrieval, "global_descriptors", real)
    idx, plan = update_index(tmp_path / "idx", paths, ext, CFG, FaissConfig(), batch_size=1, progress=False)
    assert len(plan.keep) == 2 and len(plan.embed) == 2 and idx.complete and len(idx.entries) == 4


def test_index_refuses_other_backbone_and_settings(tmp_path, photos):
    paths = _write_photos(tmp_path / "imgs", photos, ["chelsea", "coffee"])
    update_index(tmp_path / "idx", paths, tiny_extractor(stride=8), CFG, FaissConfig(), progress=False)
    with pytest.raises(ConfigError, match="built with .*fingerprint"):
        update_index(tmp_path / "idx", paths, tiny_extractor(stride=8, seed=1), CFG, FaissConfig(), progress=False)
    with pytest.raises(ConfigError, match="load_size: index 48 vs requested 64"):
        update_index(tmp_path / "idx", paths, tiny_extractor(stride=8),
                     DescriptorConfig("gem", load_size=64, stride=8), FaissConfig(), progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(DataError, match="not a vitdense index"):
        update_index(tmp_path / "other", paths, tiny_extractor(stride=8), CFG, FaissConfig(), progress=False)
    with pytest.raises(DataError, match="no index.json"):
        ImageIndex.load(tmp_path / "imgs")


def test_compressed_index_round_trip(tmp_path, photos):
    ext = tiny_extractor(stride=8)
    paths = _write_photos(tmp_path / "imgs", photos, ["chelsea", "coffee", "astronaut", "rocket"])
    idx, _ = update_index(tmp_path / "idx", paths, ext, CFG, FaissConfig("ivfpq", m=8), progress=False)
    loaded = ImageIndex.load(tmp_path / "idx")
    assert loaded.faiss_config.kind == "ivfpq" and loaded.index.ntotal == 4
    _, ids = loaded.search(np.asarray(loaded.vectors), 1)  # re-ranked with exact vectors: self first
    assert ids[:, 0].tolist() == [0, 1, 2, 3]


# ----------------------------------------------------------------------------------- copy detection

def _real_photos():
    """Distinct real photos: scikit-image's bundled ones and scikit-learn's two samples (no downloads)."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    names = ["chelsea", "coffee", "astronaut", "rocket", "camera", "coins", "hubble_deep_field",
             "immunohistochemistry", "moon", "page", "brick", "retina"]
    out = {}
    for name in names:
        arr = getattr(data, name)()
        out[name] = np.stack([arr] * 3, -1) if arr.ndim == 2 else arr[..., :3]
    for name, arr in zip(("china", "flower"), load_sample_images().images):
        out[name] = arr
    return out


def test_copy_detection_finds_every_source(tmp_path):
    """Strongly augmented copies of 14 real photos each retrieve their source first, through the whole
    pipeline (files → index folder → embedded queries → faiss search → copy-detection scores).

    Backbone and descriptor: a random-init tiny ViT (what a test can build offline) with GeM pooling (p=4,
    as DINO's copy detection). Random features are pooled colour/texture statistics: they survive
    geometric and degradation attacks, but not colour jitter — DINO gets that invariance from training with
    colour jitter, a random network cannot (measured: ±40 % colour jitter drops top-1 to ~0.35). So the
    copies use strength 0.7 (crops keeping ≥ 65 % of the area, flips, rotations up to 7° with the empty
    corners cropped, Gaussian blur, noise, JPEG quality 30–70) and color=0. With these settings 12 of 12
    tried (seed, backbone-width, size) combinations gave top-1 = 1.
    """
    photos = _real_photos()
    folder = tmp_path / "collection"
    folder.mkdir()
    for name, arr in photos.items():
        Image.fromarray(arr).save(folder / f"{name}.png")
    ext = tiny_extractor(stride=8, seed=1)
    cfg = DescriptorConfig("gem", load_size=128, stride=8)
    idx, _ = update_index(tmp_path / "idx", sorted(folder.iterdir()), ext, cfg, FaissConfig(), progress=False)
    rng = np.random.default_rng(11)
    sources, queries = [], []
    for row, entry in enumerate(idx.entries):
        for _ in range(3):
            queries.append(strong_augment(Image.open(entry.path), rng, strength=0.7, color=0.0))
            sources.append(row)
    qv = embed_images(ext, queries, cfg, progress=False).vectors
    scores, ids = idx.search(qv, 5)
    result = copy_detection_scores(ids, [[s] for s in sources])
    assert ids[:, 0].tolist() == sources, [(idx.entries[s].path, idx.entries[i].path)
                                           for s, i in zip(sources, ids[:, 0]) if s != i]
    assert result.top1 == 1.0 and result.map == pytest.approx(1.0)
    np.testing.assert_array_equal(np.argmax(qv @ np.asarray(idx.vectors).T, axis=1), sources)  # independent


def test_copy_detection_scores_hand_computed():
    ids = np.array([[3, 1, 2], [0, 2, 1], [5, 6, 7]])
    res = copy_detection_scores(ids, [[3], [2], [1]])
    # query 0: hit at rank 0 → AP 1; query 1: hit at rank 1 → (1/1·0 ... ) trapezoid (0 + 1/2)/2 = 0.25;
    # query 2: miss → 0
    np.testing.assert_allclose(res.aps, [1.0, 0.25, 0.0])
    assert res.top1 == pytest.approx(1 / 3) and res.first_hit.tolist() == [0, 1, -1]


# ----------------------------------------------------------------------------------- Revisited mAP

def _revisitop_map(ranks, gnd):
    """Plain transcription of the revisitop algorithm (loops, no numpy tricks) for cross-checking."""
    aps = []
    for q, g in enumerate(gnd):
        ok, junk = list(g["ok"]), list(g["junk"])
        if not ok:
            continue
        pos = [i for i in range(ranks.shape[0]) if ranks[i, q] in ok]
        jpos = [i for i in range(ranks.shape[0]) if ranks[i, q] in junk]
        adj = [p - sum(1 for j in jpos if j < p) for p in pos]
        ap = 0.0
        for j, r in enumerate(adj):
            p0 = 1.0 if r == 0 else j / r
            ap += (p0 + (j + 1) / (r + 1)) / 2 / len(ok)
        aps.append(ap)
    return float(np.mean(aps))


def test_map_hand_computed_with_junk():
    # database of 6; ranking of the single query: 2, 1, 0, 4, 3, 5; positives {0, 3}, junk {1}
    ranks = np.array([[2, 1, 0, 4, 3, 5]]).T
    res = compute_map(ranks, [{"ok": [0, 3], "junk": [1]}], kappas=(1, 2, 5))
    # junk removed → 2, 0, 4, 3, 5: positives at 0-based ranks 1 and 3
    # AP = ½·[(0/1 + 1/2)/2 + (1/3 + 2/4)/2] = ½·[0.25 + 0.41667] = 1/3
    assert res.map == pytest.approx(1 / 3)
    # precision@k over the first min(k, 4) places: @1 = 0, @2 = 1/2, @5 → @4 = 2/4
    np.testing.assert_allclose(res.p_at_k[0], [0.0, 0.5, 0.5])
    # without the junk the positives sit at ranks 2 and 4: AP = ½·[(0 + 1/3)/2 + (1/4 + 2/5)/2]
    no_junk = compute_map(ranks, [{"ok": [0, 3], "junk": []}])
    assert no_junk.map == pytest.approx(0.5 * ((1 / 3) / 2 + (0.25 + 0.4) / 2))


def test_revisited_setups_and_random_rankings_match_reference():
    ranks = np.array([[4, 0, 2, 1, 3]]).T
    gnd = [{"easy": [0], "hard": [3], "junk": [4]}]
    res = revisited_map(ranks, gnd)
    # easy: ok {0}, junk {4, 3} → 0, 2, 1: AP 1.  medium: ok {0, 3}, junk {4} → 0, 2, 1, 3: AP ½(1 + (1/3+2/4)/2)
    # hard: ok {3}, junk {4, 0} → 2, 1, 3: AP (0 + 1/3)/2
    assert res["easy"].map == pytest.approx(1.0)
    assert res["medium"].map == pytest.approx(0.5 * (1 + (1 / 3 + 0.5) / 2))
    assert res["hard"].map == pytest.approx((1 / 3) / 2)
    rng = np.random.default_rng(0)
    n, nq = 40, 6
    ranks = np.stack([rng.permutation(n) for _ in range(nq)], axis=1)
    gnd = []
    for q in range(nq):
        perm = rng.permutation(n)
        gnd.append({"ok": perm[:rng.integers(1, 8)], "junk": perm[10:10 + rng.integers(0, 6)]})
    gnd.append({"ok": [], "junk": [1]})  # no positives: excluded from the mean
    ranks = np.concatenate([ranks, ranks[:, :1]], axis=1)
    res = compute_map(ranks, gnd)
    assert np.isnan(res.aps[-1])
    assert res.map == pytest.approx(_revisitop_map(ranks, gnd))


def test_load_revisited_gnd_pickle_and_refuses_code(tmp_path):
    cfg = {"imlist": ["a", "b"], "qimlist": ["q"],
           "gnd": [{"easy": np.array([0]), "hard": np.array([], dtype=np.int64), "junk": np.array([1]),
                    "bbx": np.array([0.0, 0.0, 5.0, 5.0])}]}
    (tmp_path / "gnd.pkl").write_bytes(pickle.dumps(cfg))
    loaded = load_revisited_gnd(tmp_path / "gnd.pkl")
    assert loaded["imlist"] == ["a", "b"] and loaded["gnd"][0]["junk"].tolist() == [1]

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"imlist": Evil()}))
    with pytest.raises(DataError, match="evil.pkl"):
        load_revisited_gnd(tmp_path / "evil.pkl")


def test_average_precision_perfect_and_empty():
    assert average_precision(np.array([0, 1, 2]), 3) == pytest.approx(1.0)
    assert average_precision(np.array([], dtype=int), 3) == 0.0


# ----------------------------------------------------------------------------------- k-NN

def test_knn_equals_independent_loop():
    rng = np.random.default_rng(0)
    classes, dim = 4, 8
    centers = rng.normal(size=(classes, dim))
    ytr = rng.integers(0, classes, 120)
    xtr = centers[ytr] + 0.8 * rng.normal(size=(120, dim))
    yte = rng.integers(0, classes, 30)
    xte = centers[yte] + 0.8 * rng.normal(size=(30, dim))
    votes, pred = knn_classify(torch.tensor(xtr), torch.tensor(ytr), torch.tensor(xte), k=20, T=0.07,
                               num_classes=classes, chunk=7)
    ntr = xtr / np.linalg.norm(xtr, axis=1, keepdims=True)
    correct = []
    for i in range(len(xte)):
        q = xte[i] / np.linalg.norm(xte[i])
        sims = ntr @ q
        expected = np.zeros(classes)
        for j in np.argsort(-sims)[:20]:
            expected[ytr[j]] += np.exp(sims[j] / 0.07)
        np.testing.assert_allclose(votes[i].numpy(), expected, rtol=1e-4)
        assert pred[i].item() == int(np.argmax(expected))
        correct.append(int(np.argmax(expected)) == yte[i])
    top1, top5 = knn_accuracy(torch.tensor(xtr), torch.tensor(ytr), torch.tensor(xte), torch.tensor(yte))
    assert top1 == pytest.approx(100 * np.mean(correct)) and 50 < top1 < 100  # neither trivial nor perfect
    assert top5 is None  # 4 classes: the label is always among the top 5, so top-5 is left out


# ----------------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("w")
    return save_tiny_weights(folder / "tiny.safetensors", depth=2), save_tiny_weights(folder / "other.safetensors",
                                                                                      depth=2, seed=3)


def test_cli_index_search_and_errors(tmp_path, photos, weights):
    w, other = weights
    imgs = tmp_path / "imgs"
    _write_photos(imgs, photos, ["chelsea", "coffee", "astronaut"])
    (imgs / "broken.jpg").write_bytes(b"junk")
    common = ["--weights", w, "--device", "cpu", "--load-size", 48, "--workers", 0]
    res = run("index", imgs, "--out", tmp_path / "idx", "--descriptor", "both", *common)
    assert res.exit_code == 0, res.output
    assert "3 image(s)" in res.output and "skipped" in res.output and "broken.jpg" in res.output
    res = run("index", imgs, "--out", tmp_path / "idx", "--descriptor", "both", *common)
    assert "embedded 0" in res.output and "reused 3" in res.output
    query = tmp_path / "q.png"
    Image.fromarray(photos["coffee"][40:360, 60:560]).save(query)
    res = run("search", query, "--index", tmp_path / "idx", "-k", 2, "--out", tmp_path / "s", "--device", "cpu")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "s" / "results.json").read_text())
    hits = report["queries"][0]["results"]
    assert len(hits) == 2 and hits[0]["path"].endswith("coffee.png") and hits[0]["score"] >= hits[1]["score"]
    for hit in hits:  # printed ranked, with scores
        assert f"{hit['rank']:3d}  {hit['score']:.4f}  {hit['path']}" in res.output
    sheet = Image.open(tmp_path / "s" / "000_q_results.png")
    assert sheet.width > sheet.height > 0  # query + 2 results side by side
    assert_user_error(run("search", query, "--index", tmp_path / "idx", "--dtype", "bfloat16", "--device", "cpu"),
                      "--dtype float32")
    assert_user_error(run("search", query, "--index", tmp_path / "idx", "--weights", other, "--device", "cpu"),
                      "built with", "other")
    # --model auto (the other commands' default) means the index's own backbone here, not a new choice
    res = run("search", query, "--index", tmp_path / "idx", "--model", "auto", "-k", 2, "--out", tmp_path / "s2",
              "--device", "cpu")
    assert res.exit_code == 0, res.output
    index_json = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert index_json["backbone"]["weights_used"] == str(w)
    # another named backbone is refused before it is loaded (a hub name would wait on the network)
    import vitdense.extractor

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vitdense.extractor, "load_backbone", lambda *a, **k: pytest.fail("backbone loaded"))
        assert_user_error(run("search", query, "--index", tmp_path / "idx", "--model", "dino_vits16"),
                          str(tmp_path / "idx"), "model 'tiny'", "not --model dino_vits16")
    assert_user_error(run("index", imgs, "--out", tmp_path / "idx", "--descriptor", "cls", *common),
                      "descriptor settings differ")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(run("index", empty, "--out", tmp_path / "idx2", *common), "no image files")
    # an impossible IVF-PQ setting fails before any image is embedded, and writes nothing
    assert_user_error(run("index", imgs, "--out", tmp_path / "idx3", "--compressed", "--pq-m", 7, *common),
                      "--pq-m 7", "dimension 96")
    assert not (tmp_path / "idx3").exists()
    assert_user_error(run("search", query, "--index", imgs), "not a vitdense index")


def test_cli_evaluations(tmp_path, photos, weights):
    w, _ = weights
    common = ["--weights", w, "--device", "cpu", "--load-size", 48, "--workers", 0, "--descriptor", "gem"]
    # k-NN: two classes of crops of two photos
    for split, offs in (("train", (0, 30, 60)), ("val", (15, 45))):
        for cls in ("chelsea", "coffee"):
            (tmp_path / split / cls).mkdir(parents=True)
            for o in offs:
                Image.fromarray(photos[cls][o:o + 200, o:o + 200]).save(tmp_path / split / cls / f"{o}.png")
    res = run("retrieval-eval", "knn", tmp_path / "train", tmp_path / "val", "--out", tmp_path / "knn", *common)
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "knn" / "knn.json").read_text())
    assert report["val"] == 4 and report["train"] == 6
    confusion = np.array(report["confusion"])
    assert confusion.sum() == 4 and (tmp_path / "knn" / "knn_confusion.png").is_file()
    assert report["top1"] == pytest.approx(100 * np.trace(confusion) / confusion.sum())  # the table's diagonal
    assert "top5" not in report and "top-5" not in res.output  # 2 classes: the label is always in the top 5
    picture = np.asarray(Image.open(tmp_path / "knn" / "knn_confusion.png").convert("RGB"))
    assert (picture.min(axis=2) < 100).sum() > 100  # counts and class names written, not a blur of 4 colours
    # copy detection: the scores equal those of a ranking computed here from independently embedded copies
    imgs = tmp_path / "imgs"
    paths = _write_photos(imgs, photos, ["astronaut", "chelsea", "coffee", "rocket"])
    res = run("retrieval-eval", "copy", imgs, "--copies", 2, "--out", tmp_path / "cd", *common)
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "cd" / "copy_detection.json").read_text())
    assert report["queries"] == 8 and report["database"] == 4

    from vitdense.extractor import ViTExtractor

    ext = ViTExtractor(None, stride=8, weights=w, device="cpu")  # as the CLI builds it
    cfg = DescriptorConfig("gem", load_size=48, stride=8)
    originals = [Image.open(p).convert("RGB") for p in paths]
    rng = np.random.default_rng(0)  # the CLI's --seed: two copies of each image in turn
    copies = [strong_augment(im, rng, 1.0, 1.0) for im in originals for _ in range(2)]
    db = embed_images(ext, originals, cfg, progress=False).vectors
    qv = embed_images(ext, copies, cfg, progress=False).vectors
    sources = [0, 0, 1, 1, 2, 2, 3, 3]
    ranks = [int(np.flatnonzero(np.argsort(-(q @ db.T)) == s)[0]) for q, s in zip(qv, sources)]  # 0-based
    # one positive at rank r: precision 1 before it when r = 0 (else 0), 1 / (r + 1) at it; AP = the mean
    aps = [(1.0 + 1.0) / 2 if r == 0 else (0.0 + 1 / (r + 1)) / 2 for r in ranks]
    assert [q["first_hit_rank"] for q in report["per_query"]] == [r + 1 for r in ranks]
    assert report["mAP"] == pytest.approx(np.mean(aps)) and report["top1"] == pytest.approx(np.mean(np.equal(ranks, 0)))
    assert 0 < report["top1"] < 1, ranks  # the strong copies are not all found first: a ranking to score
    # copies that are the originals, JPEG re-compressed and maybe mirrored, all rank their source first
    res = run("retrieval-eval", "copy", imgs, "--copies", 2, "--strength", 0, "--color", 0, "--out",
              tmp_path / "cd0", *common)
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "cd0" / "copy_detection.json").read_text())
    assert report["mAP"] == 1.0 and report["top1"] == 1.0
    assert_user_error(run("retrieval-eval", "revisited", tmp_path, "--gnd", tmp_path / "nope.pkl", *common),
                      "nope.pkl")


def test_cli_revisited_on_a_revisitop_folder(tmp_path, photos, weights):
    """A toy data set laid out as revisitop's (DATASET/jpg/*.jpg + DATASET/gnd_*.pkl with numpy arrays): the
    query is cropped to its bounding box, and the Easy/Medium/Hard mAP printed and written equal the ones of
    a ranking computed here from independently embedded images, scored by the plain revisitop transcription
    with the setups written out by hand."""
    w, _ = weights
    names = ["chelsea", "coffee", "astronaut", "rocket"]
    root = tmp_path / "rtoy"
    (root / "jpg").mkdir(parents=True)
    for name in names:
        img = Image.fromarray(photos[name])
        img.thumbnail((120, 120))
        img.save(root / "jpg" / f"{name}.jpg")
    bbx = np.array([10.0, 5.0, 100.0, 70.0])
    gnd = {"imlist": names, "qimlist": ["chelsea"],
           "gnd": [{"easy": np.array([0]), "hard": np.array([3, 1]), "junk": np.array([2]), "bbx": bbx}]}
    (root / "gnd_rtoy.pkl").write_bytes(pickle.dumps(gnd))
    res = run("retrieval-eval", "revisited", root, "--out", tmp_path / "rv", "--weights", w, "--device", "cpu",
              "--load-size", 48, "--workers", 0, "--descriptor", "gem")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "rv" / "revisited.json").read_text())
    assert (tmp_path / "rv" / "revisited_top5.png").is_file()

    from vitdense.extractor import ViTExtractor

    ext = ViTExtractor(None, stride=8, weights=w, device="cpu")  # as the CLI builds it
    cfg = DescriptorConfig("gem", load_size=48, stride=8)
    db = embed_images(ext, [root / "jpg" / f"{n}.jpg" for n in names], cfg, progress=False).vectors
    query = Image.open(root / "jpg" / "chelsea.jpg").convert("RGB").crop((10, 5, 100, 70))
    q = embed_images(ext, [query], cfg, progress=False).vectors
    ranks = np.argsort(-(q @ db.T), axis=1).T  # (N, 1)
    setups = {"easy": {"ok": [0], "junk": [2, 3, 1]}, "medium": {"ok": [0, 3, 1], "junk": [2]},
              "hard": {"ok": [3, 1], "junk": [2, 0]}}
    for setup, g in setups.items():
        assert report[setup]["mAP"] == pytest.approx(100 * _revisitop_map(ranks, [g]), abs=1e-6), setup
        assert f"{report[setup]['mAP']:6.2f}" in res.output
    assert_user_error(run("retrieval-eval", "revisited", tmp_path / "rv", "--weights", w), "gnd_*.pkl")

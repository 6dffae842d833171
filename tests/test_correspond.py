"""vitdense.correspond: best buddies vs brute force, pair selection, coordinate maps, shift recovery, PCK."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_extractor
from vitdense.correspond import (Geometry, best_buddies, default_layer, disparity_targets,
                                 draw_correspondences, empty_reason, find_correspondences, homography_targets,
                                 keypoint_threshold, kmeans, match_descriptors, nearest_neighbours, pck,
                                 pixel_to_token, salient_buddies, select_pairs, token_to_pixel,
                                 transfer_keypoints)
from vitdense.errors import ConfigError, ImageError


def brute_force_buddies(a: np.ndarray, b: np.ndarray) -> set[tuple[int, int]]:
    """Mutual nearest neighbours from the full cosine matrix, written plainly."""
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True)
    sim = an @ bn.T
    ab, ba = sim.argmax(axis=1), sim.argmax(axis=0)
    return {(i, int(ab[i])) for i in range(len(a)) if ba[ab[i]] == i}


@pytest.fixture
def descriptors():
    rng = np.random.default_rng(0)
    # correlated sets so that there are plenty of buddies: B = a noisy permutation of part of A plus extras
    a = rng.normal(size=(57, 16)).astype(np.float32)
    b = np.concatenate([a[rng.permutation(57)[:40]] + 0.3 * rng.normal(size=(40, 16)),
                        rng.normal(size=(9, 16))]).astype(np.float32)
    return a, b


@pytest.mark.parametrize("kwargs", [dict(), dict(chunk_size=1), dict(chunk_size=5), dict(chunk_size=56),
                                    dict(max_bytes=4 * 49 * 3), dict(backend="faiss")])
def test_best_buddies_equal_brute_force(descriptors, kwargs):
    a, b = descriptors
    nn = nearest_neighbours(torch.from_numpy(a), torch.from_numpy(b), **kwargs)
    ia, ib, sim = best_buddies(nn)
    expected = brute_force_buddies(a, b)
    assert len(expected) > 20
    assert set(zip(ia.tolist(), ib.tolist())) == expected
    cos = (a[ia] * b[ib]).sum(1) / np.linalg.norm(a[ia], axis=1) / np.linalg.norm(b[ib], axis=1)
    np.testing.assert_allclose(sim.numpy(), cos, rtol=1e-5, atol=1e-6)
    # both directions are the full-matrix argmaxes
    full = torch.nn.functional.normalize(torch.from_numpy(a), dim=1) @ \
        torch.nn.functional.normalize(torch.from_numpy(b), dim=1).T
    assert torch.equal(nn.nn_ab, full.argmax(1)) and torch.equal(nn.nn_ba, full.argmax(0))


def test_bad_backend(descriptors):
    with pytest.raises(ConfigError, match="backend=.annoy.: choose one of"):
        nearest_neighbours(torch.from_numpy(descriptors[0]), torch.from_numpy(descriptors[1]), backend="annoy")


def test_salient_filter_keeps_pairs_with_both_points_salient():
    ia, ib = torch.tensor([0, 1, 2, 3]), torch.tensor([3, 2, 1, 0])
    sal_a, sal_b = torch.tensor([0.9, 0.01, 0.5, 0.7]), torch.tensor([0.02, 0.6, 0.8, 0.9])
    keep = salient_buddies(ia, ib, sal_a, sal_b, 0.05, rule="both")
    # pair (0, 3): 0.9 / 0.9 kept; (1, 2): A not salient; (2, 1): kept; (3, 0): B 0.02 not salient
    assert keep.tolist() == [True, False, True, False]


def reference_rule_buddies(a: np.ndarray, b: np.ndarray, sal_a: np.ndarray, sal_b: np.ndarray,
                           thresh: float) -> set[tuple[int, int]]:
    """dino-vit-features' filter written plainly: a best buddy (i, j) is kept when A token i is salient and
    some salient B token k has i as its nearest A token (k need not be j)."""
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True)
    nn_ba = (an @ bn.T).argmax(axis=0)
    kept = set()
    for i, j in brute_force_buddies(a, b):
        pointed_at = any(sal_b[k] > thresh and nn_ba[k] == i for k in range(len(b)))
        if sal_a[i] > thresh and pointed_at:
            kept.add((i, j))
    return kept


def test_reference_saliency_rule_by_hand():
    """A = e0..e3; B = e0, e1, 0.9 e1 + 0.1 e2, e2, e3. Buddies (0,0), (1,1), (2,3), (3,4). B1 is background
    but the salient B2 also has A1 as nearest neighbour: the reference keeps (1,1), "both" drops it. (2,3)
    has a background B3 and no salient B token pointing at A2; (3,4) has a background A3: both rules drop
    them."""
    a = np.eye(4, dtype=np.float32)
    b = np.stack([a[0], a[1], 0.9 * a[1] + 0.1 * a[2], a[2], a[3]])
    sal_a = np.array([0.9, 0.8, 0.7, 0.01])
    sal_b = np.array([0.9, 0.01, 0.9, 0.02, 0.9])
    geom = Geometry((2, 2), (4, 4), 8, (12, 12), (12, 12))
    found = {}
    for rule in ("both", "reference"):
        _, buddies, mutual = match_descriptors(torch.from_numpy(a), torch.from_numpy(b), torch.tensor(sal_a),
                                               torch.tensor(sal_b), geom, geom, thresh=0.05, salient=rule)
        assert mutual == 4
        found[rule] = set(zip(buddies.tokens_a.tolist(), buddies.tokens_b.tolist()))
    assert found["both"] == {(0, 0)}
    assert found["reference"] == {(0, 0), (1, 1)} == reference_rule_buddies(a, b, sal_a, sal_b, 0.05)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_saliency_rule_equals_plain_computation(descriptors, seed):
    a, b = descriptors
    rng = np.random.default_rng(seed)
    sal_a, sal_b = rng.uniform(size=len(a)), rng.uniform(size=len(b))
    geom_a = Geometry((3, 19), (4, 4), 8, (16, 80), (16, 80))
    geom_b = Geometry((7, 7), (4, 4), 8, (32, 32), (32, 32))
    found = {}
    for rule in ("both", "reference"):
        _, buddies, _ = match_descriptors(torch.from_numpy(a), torch.from_numpy(b), torch.tensor(sal_a),
                                          torch.tensor(sal_b), geom_a, geom_b, thresh=0.5, salient=rule,
                                          chunk_size=6)
        found[rule] = set(zip(buddies.tokens_a.tolist(), buddies.tokens_b.tolist()))
    assert found["reference"] == reference_rule_buddies(a, b, sal_a, sal_b, 0.5)
    both = {(i, j) for i, j in brute_force_buddies(a, b) if sal_a[i] > 0.5 and sal_b[j] > 0.5}
    assert found["both"] == both and both < found["reference"]  # the reference keeps more here


def test_unknown_rules_are_user_errors(descriptors):
    a, b = (torch.from_numpy(x) for x in descriptors)
    geom = Geometry((1, 57), (4, 4), 8, (8, 232), (8, 232))
    with pytest.raises(ConfigError, match="salient=.either.: choose one of"):
        match_descriptors(a, b, torch.ones(57), torch.ones(49), geom, geom, salient="either")
    with pytest.raises(ConfigError, match="kmeans_impl=.faiss.: choose one of"):
        select_pairs(np.zeros((5, 2)), np.zeros(5), 2, kmeans_impl="faiss")


def test_select_pairs_takes_best_score_per_cluster():
    rng = np.random.default_rng(1)
    centres = np.array([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0]])
    labels = np.repeat([0, 1, 2], 6)
    feats = centres[labels] + 0.1 * rng.normal(size=(18, 3))
    score = rng.uniform(size=18)
    chosen = select_pairs(feats, score, 3)
    expected = {int(np.flatnonzero(labels == k)[np.argmax(score[labels == k])]) for k in range(3)}
    assert set(chosen.tolist()) == expected and len(chosen) == 3
    assert select_pairs(feats[:2], score[:2], 5).tolist() == [0, 1]  # fewer pairs than asked: all of them
    assert len(select_pairs(np.zeros((0, 3)), np.zeros(0), 3)) == 0


def test_pipeline_picks_the_most_salient_buddy_of_each_cluster():
    """Three well-separated groups of descriptors: k-means on the buddies' joint descriptors must find the
    groups, and the chosen pair of each group is its salient buddy of highest mean saliency."""
    rng = np.random.default_rng(4)
    group = np.repeat([0, 1, 2], 10)
    a = (rng.normal(size=(3, 8)) * 10)[group] + 0.05 * rng.normal(size=(30, 8))
    perm = rng.permutation(30)
    b = a[perm] + 0.001 * rng.normal(size=(30, 8))  # B token j is a copy of A token perm[j]
    sal_a, sal_b = rng.uniform(0.1, 1.0, 30), rng.uniform(0.1, 1.0, 30)
    sal_a[np.argmax(sal_a)] = 0.01  # the most salient A token of some group becomes background
    geom = Geometry((5, 6), (4, 4), 8, (24, 28), (24, 28))
    pairs, buddies, mutual = match_descriptors(torch.tensor(a, dtype=torch.float32),
                                               torch.tensor(b, dtype=torch.float32), torch.tensor(sal_a),
                                               torch.tensor(sal_b), geom, geom, num_pairs=3, thresh=0.05)
    inverse = np.argsort(perm)  # A token i ↔ B token inverse[i]
    assert mutual == 30 and len(buddies) == 29
    np.testing.assert_array_equal(buddies.tokens_b, inverse[buddies.tokens_a])
    joint = (sal_a + sal_b[inverse]) / 2
    expected = set()
    for g in range(3):
        members = [i for i in range(30) if group[i] == g and sal_a[i] > 0.05]
        expected.add(max(members, key=lambda i: joint[i]))
    assert set(pairs.tokens_a.tolist()) == expected
    np.testing.assert_allclose(pairs.saliency_a + pairs.saliency_b, 2 * joint[pairs.tokens_a])


def test_defaults_follow_dino_vit_features():
    """Key facet, layer 9 of 12, log-binning, stride 4, saliency threshold 0.05, its saliency filter and
    scikit-learn k-means, 10 pairs, 224 px."""
    import inspect

    from vitdense.commands.correspond import correspond

    params = inspect.signature(find_correspondences).parameters
    assert {k: params[k].default for k in ("num_pairs", "load_size", "layer", "facet", "bin", "thresh", "salient",
                                           "kmeans_impl")} == \
        dict(num_pairs=10, load_size=224, layer=None, facet="key", bin=True, thresh=0.05, salient="reference",
             kmeans_impl="sklearn")
    for fn in (match_descriptors, select_pairs):
        assert inspect.signature(fn).parameters["kmeans_impl"].default == "sklearn"
    assert inspect.signature(match_descriptors).parameters["salient"].default == "reference"
    assert default_layer(12) == 9
    cli = {p.name: p.default for p in correspond.params}
    assert {k: cli[k] for k in ("num_pairs", "load_size", "layer", "facet", "use_bin", "thresh", "stride",
                                "salient", "kmeans_impl")} == \
        dict(num_pairs=10, load_size=224, layer=None, facet="key", use_bin=True, thresh=0.05, stride=4,
             salient="reference", kmeans_impl="sklearn")


def test_empty_reason_names_what_is_missing():
    sal = torch.tensor([0.0, 0.5, 1.0])
    low = torch.tensor([0.0, 0.01, 0.02])
    assert empty_reason(sal, sal, 0.05, 3, 2) is None
    assert "no salient region in image A" in empty_reason(low, sal, 0.05, 3, 0)
    assert "no salient region in image B" in empty_reason(sal, low, 0.05, 3, 0)
    # both images have salient tokens, but no buddy joins two of them
    a = torch.eye(4)
    sal_a, sal_b = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0])
    geom = Geometry((2, 2), (4, 4), 8, (12, 12), (12, 12))
    pairs, buddies, mutual = match_descriptors(a, a.clone(), sal_a, sal_b, geom, geom)
    assert len(pairs) == len(buddies) == 0 and mutual == 4 and buddies.points_a.shape == (0, 2)
    message = empty_reason(sal_a, sal_b, 0.05, mutual, len(buddies))
    assert message.startswith("no best buddy passed the saliency filter (4 mutual")


def test_kmeans_finds_separated_blobs_and_lloyd_fixed_point():
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(4, 20)) * 10
    truth = rng.integers(0, 4, size=200)
    x = centres[truth] + rng.normal(size=(200, 20))
    labels = kmeans(torch.from_numpy(x), 4, seed=3).numpy()
    # same partition as the truth up to renaming: each found cluster is exactly one true blob
    assert len(set(zip(labels.tolist(), truth.tolist()))) == 4 == len(set(labels.tolist()))
    # Lloyd fixed point: every point is nearest to the mean of its own cluster
    means = np.stack([x[labels == k].mean(0) for k in range(4)])
    d = ((x[:, None] - means[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(d.argmin(1), labels)
    assert torch.equal(kmeans(torch.from_numpy(x), 4, seed=3), kmeans(torch.from_numpy(x), 4, seed=3))


def test_kmeans_keeps_the_best_of_its_starts_as_scikit_learn_does():
    """No clear clusters, so the starts end in different local minima: the best of 10 has the lowest inertia
    of the single starts and is within 1 % of scikit-learn's best of 10 (same algorithm, other random draws)."""
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 8)).astype(np.float32)

    def inertia(labels):
        labels = np.asarray(labels)
        return sum(((x[labels == c] - x[labels == c].mean(0)) ** 2).sum() for c in np.unique(labels))

    singles = [inertia(kmeans(x, 6, seed=s, n_init=1).numpy()) for s in range(10)]
    best = inertia(kmeans(x, 6, seed=0, n_init=10).numpy())
    assert len({round(v, 3) for v in singles}) > 1  # the starts do differ
    assert best <= min(singles[:1]) and best <= np.median(singles)
    reference = KMeans(n_clusters=6, random_state=0, n_init=10).fit(x).inertia_
    assert best == pytest.approx(reference, rel=0.01)


def test_select_pairs_with_sklearn_kmeans_as_the_reference():
    """kmeans_impl="sklearn": scikit-learn's KMeans (random_state = seed, 10 starts, as dino-vit-features
    ran it), then the reference's pick: in each cluster the first pair of highest score."""
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(2)
    feats = rng.normal(size=(40, 6)).astype(np.float32)  # no clear clusters: the initialisation matters
    score = rng.integers(0, 4, size=40).astype(np.float64)  # ties: the first index of a cluster wins
    chosen = select_pairs(feats, score, 5, seed=0, kmeans_impl="sklearn")
    labels = KMeans(n_clusters=5, random_state=0, n_init=10).fit(feats).labels_
    best, pick = np.full(5, -np.inf), np.zeros(5, np.int64)
    for i, (label, rank) in enumerate(zip(labels, score)):
        if rank > best[label]:
            best[label], pick[label] = rank, i
    assert chosen.tolist() == pick.tolist()
    assert select_pairs(feats[:3], score[:3], 5, kmeans_impl="sklearn").tolist() == [0, 1, 2]


@pytest.mark.parametrize("impl", ["sklearn", "torch"])
def test_select_pairs_with_duplicate_points(impl):
    feats = np.zeros((6, 4))  # one distinct point, 3 clusters asked: one pair, the best one
    score = np.array([0.1, 0.5, 0.9, 0.3, 0.9, 0.2])
    assert select_pairs(feats, score, 3, kmeans_impl=impl).tolist() == [2]


def test_token_pixel_maps_by_hand():
    # grid 3x4, stride 4, patch 8 on a 16x20 resized copy of a 32x40 image (factor 2)
    geom = dict(grid=(3, 4), stride=4, patch=8, load_size=(16, 20), size=(32, 40))
    pts = token_to_pixel(np.array([0, 5, 11]), **geom)
    # token 5 = row 1, col 1: resized centre 4 + 3.5 = 7.5 → original (7.5 + 0.5) * 2 - 0.5 = 15.5
    np.testing.assert_allclose(pts, [[7.5, 7.5], [15.5, 15.5], [23.5, 31.5]])  # token 11: row 2, col 3
    np.testing.assert_array_equal(pixel_to_token(pts, **geom), [0, 5, 11])
    # off-centre and outside points go to the nearest token
    np.testing.assert_array_equal(pixel_to_token(np.array([[17.0, 14.0], [-50.0, 999.0]]), **geom), [5, 3])
    same = dict(grid=(5, 5), stride=(2, 4), patch=4, load_size=(12, 20), size=(12, 20))
    np.testing.assert_allclose(token_to_pixel(np.array([6]), **same), [[2 + 1.5, 4 + 1.5]])


def test_default_layer():
    assert default_layer(12) == 9 and default_layer(4) == 3 and default_layer(24) == 18


def shifted_pair(photos, shift: int = 16, height: int = 64, width: int = 96):
    """A crop of chelsea and the same crop ``shift`` px further left: A(x) = B(x + shift)."""
    img = photos["chelsea"][60:60 + height, 120:120 + width + shift]
    return img[:, shift:], img[:, :-shift]


@pytest.mark.parametrize("load_size", [None, 32])
def test_matches_recover_a_horizontal_shift(photos, load_size):
    a, b = shifted_pair(photos)
    ext = tiny_extractor()
    result = find_correspondences(ext, a, b, num_pairs=6, load_size=load_size, thresh=0.0)
    assert result.size_a == (64, 96) and result.message is None
    assert len(result.pairs) == 6 and len(result.buddies) > 20
    for matches in (result.buddies, result.pairs):
        dx = matches.points_b[:, 1] - matches.points_a[:, 1]
        dy = matches.points_b[:, 0] - matches.points_a[:, 0]
        # coordinates are original pixels: a 16-px shift also when the network saw a half-size copy
        assert np.mean(np.isclose(dx, 16) & np.isclose(dy, 0)) > 0.9, (dx, dy)
    # pairs are a subset of the buddies, with the same similarities/saliency
    buddy = {(int(i), int(j)): k for k, (i, j) in enumerate(zip(result.buddies.tokens_a, result.buddies.tokens_b))}
    for i, j, s in zip(result.pairs.tokens_a, result.pairs.tokens_b, result.pairs.similarity):
        assert np.isclose(result.buddies.similarity[buddy[(int(i), int(j))]], s)


def test_pipeline_equals_brute_force_on_extracted_descriptors(photos):
    a, b = shifted_pair(photos, shift=12)
    ext = tiny_extractor()
    batch_a, _ = ext.preprocess(a, None)
    batch_b, _ = ext.preprocess(b, None)
    fa = ext.extract(batch_a, [3], "key", bin=True, saliency=True)
    fb = ext.extract(batch_b, [3], "key", bin=True, saliency=True)
    da, db = fa.descriptors[3][0].clone(), fb.descriptors[3][0].clone()
    sa, sb = fa.saliency[0], fb.saliency[0]
    ga = Geometry(fa.num_patches, ext.stride, ext.p, fa.load_size, fa.load_size)
    gb = Geometry(fb.num_patches, ext.stride, ext.p, fb.load_size, fb.load_size)
    pairs, buddies, mutual = match_descriptors(da, db, sa, sb, ga, gb, 4, 0.3, chunk_size=7)
    expected = brute_force_buddies(da.numpy(), db.numpy())
    assert mutual == len(expected)
    salient = reference_rule_buddies(da.numpy(), db.numpy(), sa.numpy(), sb.numpy(), 0.3)  # the default rule
    assert set(zip(buddies.tokens_a.tolist(), buddies.tokens_b.tolist())) == salient
    np.testing.assert_allclose(buddies.saliency_a, sa[buddies.tokens_a].numpy())
    np.testing.assert_allclose(buddies.points_a, token_to_pixel(buddies.tokens_a, fa.num_patches, 4, 8,
                                                                fa.load_size, fa.load_size))
    assert len(pairs) == min(4, len(buddies))


def test_no_salient_region_gives_an_empty_valid_result(photos):
    a, b = shifted_pair(photos)
    result = find_correspondences(tiny_extractor(), a, b, thresh=1.0, load_size=None)
    assert len(result.pairs) == 0 and len(result.buddies) == 0
    assert result.num_mutual > 0 and "no salient region" in result.message
    assert result.pairs.points_a.shape == (0, 2) and result.pairs.to_records() == []


def test_bad_images(tmp_path, photos):
    ext = tiny_extractor()
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ImageError, match="broken.jpg"):
        find_correspondences(ext, bad, photos["coffee"])
    from PIL import Image

    small = tmp_path / "small.png"
    Image.fromarray(photos["coffee"][:5, :5]).save(small)
    with pytest.raises(ImageError, match="small.png.*smaller than one"):
        find_correspondences(ext, photos["coffee"], small, load_size=None)
    with pytest.raises(ConfigError, match="layer=7: the model has 4 layers"):
        find_correspondences(ext, photos["coffee"], photos["coffee"], layer=7)


def test_draw_correspondences_shape_and_colours(photos):
    a, b = photos["chelsea"], photos["coffee"]  # 300x451 and 400x600
    pts = np.array([[10.0, 20.0], [100.0, 200.0]])
    pic = draw_correspondences(a, b, pts, pts, height=200)
    assert pic.dtype == np.uint8 and pic.shape == (200, round(451 * 200 / 300) + 8 + 300, 3)
    y, x = (pts[1] * 200 / 300).round().astype(int)
    assert tuple(pic[y, x]) == (255, 255, 0)  # second pair: yellow dot at its scaled position
    # ... joined by a yellow line to its partner in B (scaled by 1/2, shifted by A's width + the gap)
    yb, xb = pts[1] * 200 / 400 + [0, 301 + 8]
    ym, xm = round((y + yb) / 2), round((x + xb) / 2)
    assert (pic[ym - 1:ym + 2, xm - 1:xm + 2] == (255, 255, 0)).all(-1).any()
    # ... and numbered: the label right of the dot is what differs from a picture without labels
    bare = draw_correspondences(a, b, pts, pts, height=200, labels=False)
    changed = (pic != bare).any(-1)
    assert changed[y - 10:y + 6, x + 7:x + 20].sum() > 5  # the "2" next to the second dot
    assert not changed[y - 10:y + 6, x - 20:x - 6].any()  # nothing on the dot's other side


# ------------------------------------------------------------------------------------------- PCK maths

def test_pck_by_hand():
    pred = np.array([[0.0, 0.0], [0.0, 3.0], [4.0, 3.0], [9.0, 9.0]])
    target = np.zeros((4, 2))  # distances 0, 3, 5, 12.73
    got = pck(pred, target, 40.0, alphas=(0.05, 0.10, 0.15))  # thresholds 2, 4, 6 px
    assert got == {0.05: 0.25, 0.10: 0.5, 0.15: 0.75}
    got = pck(pred, target, np.array([40.0, 40.0, 100.0, 10.0]), alphas=(0.05,), valid=[True, True, True, False])
    assert got == {0.05: pytest.approx(2 / 3)}  # 5 px <= 0.05 * 100
    assert np.isnan(pck(pred, target, 1.0, valid=np.zeros(4, bool))[0.05])


def test_disparity_targets_by_hand():
    disp = np.full((20, 40), 4.0)
    disp[5, 5] = np.inf
    disp[12, 7] = 2.5
    targets, valid = disparity_targets(np.array([[10.0, 20.0], [5.2, 4.8], [11.6, 7.4]]), disp)
    assert valid.tolist() == [True, False, True]
    np.testing.assert_allclose(targets[[0, 2]], [[10.0, 16.0], [11.6, 4.9]])  # (11.6, 7.4) reads d[12, 7]


def test_homography_targets_by_hand():
    hom = np.array([[2.0, 0, 1], [0, 2.0, 3], [0, 0, 1]])
    targets, valid = homography_targets(np.array([[1.0, 2.0], [0.0, 0.0]]), hom)
    np.testing.assert_allclose(targets, [[5.0, 5.0], [3.0, 1.0]])  # (x, y) = (2, 1) → (5, 5)
    persp = np.array([[1.0, 0, 0], [0, 1.0, 0], [0.5, 0, 1.0]])
    targets, valid = homography_targets(np.array([[4.0, 2.0], [1.0, -4.0]]), persp)
    np.testing.assert_allclose(targets[0], [2.0, 1.0])  # w = 0.5 * 2 + 1 = 2
    assert valid.tolist() == [True, False]  # w = -1: behind the camera
    with pytest.raises(ConfigError):
        homography_targets(np.zeros((1, 2)), np.eye(2))


def test_keypoint_transfer_and_threshold(photos):
    a, b = shifted_pair(photos)
    ext = tiny_extractor()
    fa = ext.extract(ext.preprocess(a, None)[0], [3], "key", bin=True)
    fb = ext.extract(ext.preprocess(b, None)[0], [3], "key", bin=True)
    h, w = fa.num_patches
    tokens_a = np.array([2 * w + 3, 5 * w + 6, 8 * w + 10])
    tokens_b, mutual = transfer_keypoints(fa.descriptors[3][0], fb.descriptors[3][0], tokens_a)
    np.testing.assert_array_equal(tokens_b, tokens_a + 4)  # 16 px = 4 tokens at stride 4
    assert mutual.all()
    assert keypoint_threshold((300, 451)) == 451 and keypoint_threshold(bbox=(10, 20, 50, 120)) == 100

"""vitdense.cosegment, vitdense.crf and vitdense.metrics on synthetic data whose answer is known."""
from __future__ import annotations

import math

import numpy as np
import pytest

from vitdense import cosegment as cs
from vitdense.crf import CrfParams, crf_labels, grabcut_mask, mask_energies, refine_mask
from vitdense.metrics import ari, contingency, jaccard, nmi, part_scores, precision

D = 64
GRID = (8, 10)


def basis(i: int) -> np.ndarray:
    v = np.zeros(D, np.float32)
    v[i] = 1.0
    return v


def scene(regions: np.ndarray, rng: np.random.Generator, noise: float = 0.05) -> np.ndarray:
    """Descriptors (T, D) of a grid whose region id r (h, w) is drawn around basis vector r."""
    desc = np.stack([basis(r) for r in regions.reshape(-1)])
    return desc + noise * rng.standard_normal(desc.shape).astype(np.float32)


def object_set(n: int = 4, seed: int = 0):
    """n images: a common object (region 0) on a background (region 1); image 0 also holds a salient
    distractor (region 2) that only it contains. Returns descriptors, saliency, truth masks."""
    rng = np.random.default_rng(seed)
    descs, sals, truths = [], [], []
    for i in range(n):
        regions = np.ones(GRID, int)
        top, left = 1 + i % 3, 2 + i % 4
        regions[top:top + 4, left:left + 4] = 0
        if i == 0:
            regions[5:8, 0:3] = 2
        descs.append(scene(regions, rng))
        sal = np.where(regions == 1, 0.01, 0.9) + 0.005 * rng.random(GRID)
        sals.append(sal.reshape(-1).astype(np.float32))
        truths.append(regions == 0)
    return descs, sals, truths


# ---------------------------------------------------------------------------------------------- object stage

def test_cosegment_finds_common_object_and_ignores_distractor():
    descs, sals, truths = object_set()
    result = cs.cosegment(descs, sals, [GRID] * 4, sample_interval=1, seed=0, niter=20, nredo=5)
    # object, background, distractor, and the 4th cluster at which the elbow search stalled: dino-vit-features
    # keeps it (--elbow-k after); --elbow-k before stops at the three regions
    assert result.clustering.k == 4
    assert cs.cosegment(descs, sals, [GRID] * 4, sample_interval=1, seed=0, niter=20, nredo=5,
                        elbow_k="before").clustering.k == 3
    for mask, truth in zip(result.masks, truths):
        np.testing.assert_array_equal(mask, truth)
    # the distractor's cluster is salient in one image only: 1 vote < ceil(4 * 0.75) = 3
    distractor = result.labels[0][7, 0]
    assert result.votes[distractor] == 1 and not result.salient[distractor]
    assert result.salient.sum() == 1


def test_cosegment_given_k_and_outlier_and_voters():
    descs, sals, truths = object_set(5)
    inliers = np.array([True, True, True, True, False])
    result = cs.cosegment(descs, sals, [GRID] * 5, sample_interval=1, n_clusters=3, inliers=inliers, seed=1, niter=20, nredo=2)
    assert result.clustering.k == 3 and len(result.clustering.objectives) == 1
    assert not result.masks[4].any() and (result.labels[4] == -1).all()
    assert np.isnan(result.mean_saliency[4]).all()
    for mask, truth in zip(result.masks[:4], truths[:4]):
        np.testing.assert_array_equal(mask, truth)
    # with only images 1 and 2 voting (need ceil(2 * .75) = 2 votes), the object is still the only winner
    voters = np.array([False, True, True, False, False])
    again = cs.cosegment(descs, sals, [GRID] * 5, sample_interval=1, n_clusters=3, inliers=inliers, voters=voters, seed=1, niter=20,
                         nredo=2)
    assert again.votes.max() == 2 and again.salient.sum() == 1


def test_cosegment_is_deterministic_for_a_seed():
    descs, sals, _ = object_set()
    rng = np.random.default_rng(3)
    noisy = [d + 0.4 * rng.standard_normal(d.shape).astype(np.float32) for d in descs]
    a = cs.cosegment(noisy, sals, [GRID] * 4, sample_interval=1, n_clusters=5, seed=7, niter=10, nredo=2)
    b = cs.cosegment(noisy, sals, [GRID] * 4, sample_interval=1, n_clusters=5, seed=7, niter=10, nredo=2)
    np.testing.assert_array_equal(a.clustering.centroids, b.clustering.centroids)
    for x, y in zip(a.labels, b.labels):
        np.testing.assert_array_equal(x, y)


def test_vote_salient_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    k, n = 6, 7
    labels = [rng.integers(0, k - 1, size=50) for _ in range(n)]  # cluster k-1 never occurs
    sal = [rng.random(50).astype(np.float32) ** 3 for _ in range(n)]
    thresh, pct = 0.2, 60
    mean = cs.cluster_saliency(labels, sal, k)
    votes, salient = cs.vote_salient(mean, thresh, pct)
    expected = np.zeros(k, int)
    for lab, s in zip(labels, sal):
        for c in range(k):
            vals = [s[t] for t in range(50) if lab[t] == c]
            if vals and sum(vals) / len(vals) > thresh:
                expected[c] += 1
    np.testing.assert_array_equal(votes, expected)
    np.testing.assert_array_equal(salient, expected >= math.ceil(n * pct / 100))
    assert np.isnan(mean[:, k - 1]).all() and votes[k - 1] == 0


def test_cls_inliers_flags_the_odd_image():
    rng = np.random.default_rng(0)
    base = rng.standard_normal(32)
    cls = np.stack([base + 0.3 * rng.standard_normal(32) for _ in range(5)] + [-base])
    sims = [float(c @ cls.mean(0) / np.linalg.norm(c) / np.linalg.norm(cls.mean(0))) for c in cls]
    np.testing.assert_array_equal(cs.cls_inliers(cls, 0.7), np.array(sims) >= 0.7)
    assert cs.cls_inliers(cls, 0.7).tolist() == [True] * 5 + [False]


# ---------------------------------------------------------------------------------------------- k-means pieces

def test_kmeans_gives_the_centroids_of_the_references_faiss_call():
    import faiss

    rng = np.random.default_rng(1)
    x = cs.unit(rng.standard_normal((900, 16)).astype(np.float32))
    for k in (1, 3, 5):  # 900 points: faiss subsamples 256 per centroid for k = 1 and 3, not for 5
        # dino-vit-features: faiss.Kmeans(d=..., k=n_clusters, niter=300, nredo=10), faiss' other defaults
        ref = faiss.Kmeans(d=16, k=k, niter=300, nredo=10)
        ref.train(x.copy())
        np.testing.assert_array_equal(cs.kmeans(x, k), ref.centroids)
    other = cs.kmeans(x, 3, seed=1)
    assert not np.array_equal(other, cs.kmeans(x, 3))  # the seed is used
    ref = faiss.Kmeans(d=16, k=3, niter=300, nredo=10, seed=1235)
    ref.train(x.copy())
    np.testing.assert_array_equal(other, ref.centroids)


def test_elbow_finds_the_number_of_clusters_of_a_mixture():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((5, 32)) * 3
    points = np.concatenate([c + 0.2 * rng.standard_normal((300, 32)) for c in centres]).astype(np.float32)
    points = cs.unit(points[rng.permutation(len(points))])
    train, heldout = points[::2], points[1::2]

    def on_heldout(centroids):
        return float((((heldout[:, None] - centroids[None]) ** 2).sum(-1)).min(1).mean())

    # 10 restarts, the reference's: with 3, some seeds stop in a local minimum that merges two components
    before = cs.fit_clusters(train, on_heldout, elbow=0.975, seed=0, niter=30, nredo=10, elbow_k="before")
    assert before.k == 5
    assert len(before.objectives) == 6  # k = 6 was tried and rejected
    assert before.objectives[5] > 0.975 * before.objectives[4]
    assert before.objectives[4] < 0.975 * before.objectives[3]
    # dino-vit-features keeps the k = 6 its loop stopped at: one cluster more than the mixture has
    after = cs.fit_clusters(train, on_heldout, elbow=0.975, seed=0, niter=30, nredo=10, elbow_k="after")
    assert after.k == 6 and after.objectives == before.objectives


def test_choose_k_rule():
    assert cs.choose_k([10, 5, 4.9, 1], 0.975, "before") == 2  # 4.9 > 0.975 * 5: stop before the 3rd cluster
    assert cs.choose_k([10, 5, 4.9, 1], 0.975, "after") == 3  # ... or keep the 3rd, as the reference does
    for rule in cs.ELBOW_KS:
        assert cs.choose_k([10, 5, 2], 0.975, rule) == 3  # never stalls: the largest k tried
    assert cs.choose_k([10, 9.8], 0.975, "before") == 1
    assert cs.choose_k([10, 9.8], 0.975, "after") == 2
    assert cs.choose_k([0.0, 0.0], 0.975, "before") == 1  # identical descriptors: one cluster
    with pytest.raises(ValueError, match="elbow_k"):
        cs.choose_k([10, 5], 0.975, "middle")


def test_elbow_objective_over_all_descriptors_or_a_heldout_sample():
    rng = np.random.default_rng(3)
    descs = [rng.standard_normal((37, 6)).astype(np.float16), rng.standard_normal((20, 6)).astype(np.float16)]
    masks = [rng.random(37) < 0.5, None]
    centroids = cs.unit(rng.standard_normal((3, 6)))
    first, second = descs[0][masks[0]].astype(np.float64), descs[1].astype(np.float64)
    first /= np.linalg.norm(first, axis=1, keepdims=True)
    second /= np.linalg.norm(second, axis=1, keepdims=True)

    def mean_nearest(rows):
        return (((rows[:, None] - centroids[None]) ** 2).sum(-1)).min(1).mean()

    every = cs.elbow_objective(descs, [0, 1], 4, "all", masks)
    assert every(centroids) == pytest.approx(mean_nearest(np.concatenate([first, second])), rel=1e-5)
    # the held-out sample: every 4th token of each image, from the 3rd (half an interval after the training one)
    heldout = cs.elbow_objective(descs, [0, 1], 4, "heldout", masks)
    assert heldout(centroids) == pytest.approx(mean_nearest(np.concatenate([first[2::4], second[2::4]])), rel=1e-5)
    assert cs.elbow_objective(descs, [0, 1], 1, "heldout") is None  # interval 1: the training sample itself


def test_sq_distances_and_assign_match_brute_force():
    rng = np.random.default_rng(1)
    x, c = rng.standard_normal((53, 7)).astype(np.float32), rng.standard_normal((4, 7)).astype(np.float32)
    brute = ((x[:, None, :] - c[None]) ** 2).sum(-1)
    np.testing.assert_allclose(cs.sq_distances(x, c, chunk=10), brute, rtol=1e-4, atol=1e-4)
    labels, dist = cs.assign(x, c)
    np.testing.assert_array_equal(labels, brute.argmin(1))
    np.testing.assert_allclose(dist, brute.min(1), rtol=1e-4, atol=1e-4)


def test_subsample_and_interval():
    rng = np.random.default_rng(2)
    descs = [rng.standard_normal((30, 5)).astype(np.float32), rng.standard_normal((20, 5)).astype(np.float32)]
    masks = [np.arange(30) % 2 == 0, None]
    got = cs.subsample(descs, 4, 1, masks)
    first = descs[0][::2][1::4]
    expected = np.concatenate([first, descs[1][1::4]])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert cs.subsample(descs, 4, 0, images=[1]).shape == (5, 5)
    assert cs.effective_interval(100_000, 100, 1000) == 100
    assert cs.effective_interval(40_000, 100, 1000) == 40
    assert cs.effective_interval(10, 100, 1000) == 1


def test_order_by_count():
    order = cs.order_by_count(np.array([5, 9, 5, 1]))
    assert order.tolist() == [1, 0, 2, 3]
    old = np.array([0, 1, 2, 3, 1])
    assert np.argsort(order)[old].tolist() == [1, 0, 2, 3, 0]


def test_descriptor_store_spills_to_disk(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((100, 16)).astype(np.float32) * 3 for _ in range(4)]
    with cs.DescriptorStore(ram_mb=2 * 100 * 16 * 2 / 2**20, tmp_dir=tmp_path) as store:
        for a in arrays:
            store.append(a)
        assert len(store) == 4 and store.spilled == 2
        assert len(list(tmp_path.iterdir())) == 1
        for a, got in zip(arrays, store):
            assert got.dtype == np.float16 and got.shape == (100, 16)
            np.testing.assert_allclose(got, a / np.linalg.norm(a, axis=1, keepdims=True), atol=2e-3)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- parts

def part_set(n: int = 4, seed: int = 0, with_extra: bool = False):
    """Object = top part (region 0, 4x6 tokens) + bottom part (region 3, 2x6 tokens) on background 1.
    with_extra: a third foreground region (4) in images 1..n-1 only (not a common part)."""
    rng = np.random.default_rng(seed)
    descs, sals, truths = [], [], []
    for i in range(n):
        regions = np.ones(GRID, int)
        left = 1 + i % 3
        regions[1:5, left:left + 6] = 0
        regions[5:7, left:left + 6] = 3
        if with_extra and i > 0:
            regions[0:3, 8:10] = 4
        descs.append(scene(regions, rng))
        sals.append(np.where(regions == 1, 0.01, 0.9).reshape(-1).astype(np.float32))
        truths.append(regions)
    return descs, sals, truths


def expected_parts(regions: np.ndarray) -> np.ndarray:
    """Output labels: 0 background, 1 = the larger part (region 0), 2 = region 3."""
    return np.select([regions == 0, regions == 3], [1, 2], 0)


def test_part_cosegment_on_the_grid_labels_parts_consistently():
    descs, sals, truths = part_set()
    result = cs.part_cosegment(descs, sals, [GRID] * 4, sample_interval=1, n_parts=2, seed=0, niter=20, nredo=2)
    assert result.k == 2 and result.coseg.clustering.k == 4  # 3 regions + the k where the elbow stalled
    for parts, regions in zip(result.parts, truths):
        np.testing.assert_array_equal(parts, expected_parts(regions))


def test_part_cosegment_auto_parts_and_crf_at_image_resolution():
    descs, sals, truths = part_set()
    colours = {0: (200, 40, 40), 1: (30, 30, 30), 3: (40, 40, 220)}
    images = []
    for regions in truths:
        img = np.zeros((GRID[0] * 4, GRID[1] * 4, 3), np.uint8)
        for r, col in colours.items():
            img[np.kron(regions == r, np.ones((4, 4), bool))] = col
        images.append(img)
    result = cs.part_cosegment(descs, sals, [GRID] * 4, images, sample_interval=1, n_parts=None, seed=0, niter=20,
                               nredo=2, elbow_k="before")
    assert result.k == 2  # elbow with 0.94 finds the two parts (dino-vit-features' rule keeps a third)
    assert cs.part_cosegment(descs, sals, [GRID] * 4, sample_interval=1, n_parts=None, crf=None, seed=0, niter=20,
                             nredo=2, elbow_k="after").k == 3
    for parts, regions in zip(result.parts, truths):
        assert parts.shape == (32, 40)
        want = np.kron(expected_parts(regions), np.ones((4, 4), int))
        # the smoothness kernel (weight 50) only rounds the rectangles' corners
        assert (parts != want).mean() < 0.02
        for label in range(3):
            assert np.bincount(parts[want == label], minlength=3).argmax() == label


def test_three_stages_drop_a_non_common_foreground_cluster():
    descs, sals, truths = part_set(with_extra=True)
    result = cs.part_cosegment(descs, sals, [GRID] * 4, sample_interval=1, n_parts=2, three_stages=True, crf=None,
                               seed=0, niter=20, nredo=2, elbow_k="before")
    # region 4 is salient in 3 of 4 images (enough votes for the object stage) ...
    assert result.coseg.masks[1][0, 8] and result.stage2.k == 3
    # ... but absent from image 0, so the second stage drops it and the parts are the two common ones
    assert result.common.sum() == 2
    for parts, regions in zip(result.parts, truths):
        np.testing.assert_array_equal(parts, expected_parts(regions))


def test_part_energies_columns():
    x = np.stack([basis(0), basis(1), basis(2)])
    e = cs.part_energies(x, np.stack([basis(1), basis(2)]), np.stack([basis(0)]))
    np.testing.assert_allclose(e, [[0, 2, 2], [2, 0, 2], [2, 2, 0]], atol=1e-6)
    assert (cs.part_energies(x, np.stack([basis(1)]), np.zeros((0, D)))[:, 0] == cs.MAX_SQDIST).all()


# ---------------------------------------------------------------------------------------------- CRF

def two_tone(noise: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 64x96 image dark left / bright right (edge at column 48) and its right-half truth."""
    rng = np.random.default_rng(seed)
    img = np.zeros((64, 96, 3), np.int64)
    img[:, 48:] = 200
    img = np.clip(img + rng.integers(-noise, noise + 1, img.shape), 0, 255).astype(np.uint8)
    truth = np.zeros((64, 96), bool)
    truth[:, 48:] = True
    return img, truth


def test_crf_moves_a_noisy_mask_to_the_image_edge():
    img, truth = two_tone()
    rng = np.random.default_rng(1)
    noisy = np.zeros_like(truth)
    noisy[:, 42:] = True  # boundary 6 px off the edge
    noisy ^= rng.random(truth.shape) < 0.1  # and 10 % of the pixels flipped
    before = (noisy != truth).mean()
    refined = refine_mask(img, noisy)
    assert before > 0.14
    assert (refined != truth).mean() < 0.01
    # every row's boundary is now within 1 px of the edge
    boundary = refined.argmax(axis=1)
    assert np.abs(boundary - 48).max() <= 1


def test_grabcut_moves_a_shifted_mask_to_the_edge():
    img, truth = two_tone()
    shifted = np.zeros_like(truth)
    shifted[:, 45:] = True  # 3 px off: within the 7x7 erosion band GrabCut decides
    refined = grabcut_mask(img, shifted)
    assert (shifted != truth).mean() > 0.03
    assert (refined != truth).mean() < 0.002
    assert not grabcut_mask(img, np.zeros_like(truth)).any()


def test_crf_labels_without_crf_is_upsampled_argmin_and_mask_energies():
    energies = np.random.default_rng(0).random((3, 4, 5)).astype(np.float32)
    img = np.zeros((12, 16, 3), np.uint8)
    labels = crf_labels(img, energies, None)
    np.testing.assert_array_equal(labels, np.kron(energies.argmin(-1), np.ones((4, 4), int)))
    e = mask_energies(np.array([[0.0, 1.0]]), 0.7)
    np.testing.assert_allclose(e[0, 0], [-np.log(0.7), -np.log(0.3)], rtol=1e-6)
    np.testing.assert_allclose(e[0, 1], [-np.log(0.3), -np.log(0.7)], rtol=1e-6)
    # a flat image and a confident one-label unary: the CRF keeps it
    uniform = np.zeros((3, 4, 2), np.float32)
    uniform[..., 1] = 1.0
    assert (crf_labels(img, uniform, CrfParams()) == 0).all()


def test_refine_objects_methods():
    descs, sals, truths = object_set()
    result = cs.cosegment(descs, sals, [GRID] * 4, sample_interval=1, n_clusters=3, seed=0, niter=20, nredo=2)
    images = [np.where(np.kron(t, np.ones((4, 4), bool))[..., None], 220, 20).astype(np.uint8).repeat(3, -1)
              for t in truths]
    for method in ("none", "crf", "grabcut"):
        masks = cs.refine_objects(images, result, method)
        for m, t in zip(masks, truths):
            assert m.shape == (32, 40)
            assert (m != np.kron(t, np.ones((4, 4), bool))).mean() < 0.02, method
    # no image → grid resolution; bad method → ValueError
    assert cs.refine_objects([None] * 4, result, "crf")[0].shape == GRID
    np.testing.assert_array_equal(cs.refine_objects([None] * 4, result, "grabcut")[0], result.masks[0])
    with pytest.raises(ValueError):
        cs.refine_objects(images, result, "magic")


# ---------------------------------------------------------------------------------------------- metrics

def test_jaccard_and_precision_by_hand():
    pred = np.array([[1, 1, 0, 0]], bool)
    gt = np.array([[0, 1, 1, 0]], bool)
    assert jaccard(pred, gt) == pytest.approx(1 / 3)
    assert precision(pred, gt) == pytest.approx(2 / 4)
    assert jaccard(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0


def test_nmi_ari_match_scikit_learn():
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    rng = np.random.default_rng(0)
    for trial in range(5):
        a = rng.integers(0, 4, 500)
        b = np.where(rng.random(500) < 0.6, a, rng.integers(0, 5, 500))
        assert nmi(a, b) == pytest.approx(normalized_mutual_info_score(b, a), abs=1e-9)
        assert ari(a, b) == pytest.approx(adjusted_rand_score(b, a), abs=1e-9)
    perm = np.array([2, 0, 1, 3])[a]
    assert nmi(a, perm) == pytest.approx(1.0) and ari(a, perm) == pytest.approx(1.0)
    assert ari(np.zeros(10), rng.integers(0, 3, 10)) == pytest.approx(0.0)
    assert contingency([0, 0, 1], [5, 6, 6]).tolist() == [[1, 1], [0, 1]]


def test_part_scores_use_foreground_only():
    gt = np.array([0, 0, 0, 1, 1, 2, 2])
    pred = np.array([3, 3, 1, 2, 2, 1, 1])  # background ignored; parts match up to renaming
    assert part_scores(pred, gt) == (pytest.approx(1.0), pytest.approx(1.0))
    n_all, a_all = part_scores(pred, gt, foreground_only=False)
    assert n_all < 1.0 and a_all < 1.0

"""The picture-making API: PCA of descriptors as RGB and the patch-similarity inspector, against
independent computations."""
from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA

from vitdense import pca_rgb, similarity_map


def test_pca_rgb_is_the_joint_pca_scaled_over_all_images():
    rng = np.random.default_rng(0)
    # two images whose descriptors vary mostly along three known directions
    basis = np.linalg.qr(rng.normal(size=(16, 3)))[0].T
    descs = [rng.normal(size=(h * w, 3)) * [5.0, 3.0, 2.0] @ basis + 0.05 * rng.normal(size=(h * w, 16))
             for h, w in [(4, 6), (5, 3)]]
    grids = [(4, 6), (5, 3)]
    maps = pca_rgb(descs, grids)
    assert [m.shape for m in maps] == [(4, 6, 3), (5, 3, 3)]
    projected = PCA(3).fit_transform(np.concatenate(descs))
    ours = np.concatenate([m.reshape(-1, 3) for m in maps])
    for c in range(3):  # PCA signs are arbitrary: compare each channel up to a flip, after min-max scaling
        ref = (projected[:, c] - projected[:, c].min()) / np.ptp(projected[:, c])
        assert min(np.abs(ours[:, c] - ref).max(), np.abs(ours[:, c] - (1 - ref)).max()) < 1e-4, c
    assert ours.min() == 0.0 and ours.max() == 1.0


def test_pca_rgb_fits_on_the_masked_tokens_only():
    rng = np.random.default_rng(1)
    desc = rng.normal(size=(20, 8))
    desc[:10, 0] *= 50  # the unmasked half varies along channel 0, the masked half does not
    mask = np.arange(20) >= 10
    rgb = pca_rgb([desc], [(4, 5)], masks=[mask])[0].reshape(-1, 3)
    first = PCA(3).fit(desc[mask]).components_[0]
    expected = desc @ first
    expected = (expected - expected.min()) / np.ptp(expected)
    assert min(np.abs(rgb[:, 0] - expected).max(), np.abs(rgb[:, 0] - (1 - expected)).max()) < 1e-4


def test_similarity_map_is_cosine_similarity_to_one_token():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(12, 7)), rng.normal(size=(6, 7))
    heat = similarity_map(a, 5, b, (2, 3))
    expected = b @ a[5] / (np.linalg.norm(b, axis=1) * np.linalg.norm(a[5]))
    np.testing.assert_allclose(heat, expected.reshape(2, 3), atol=1e-6)
    assert np.isclose(similarity_map(a, 5, a, (3, 4))[1, 1], 1.0)  # a token is most similar to itself


def test_nearest_upsampling_keeps_a_float_map():
    """The PCA picture is a [0, 1] float map: nearest-neighbour upsampling must not truncate it to 0/1."""
    from vitdense.viz import upsample

    rgb = np.random.default_rng(3).random((3, 4, 3)).astype(np.float32)
    big = upsample(rgb, (6, 8), nearest=True)
    assert big.dtype.kind == "f"
    np.testing.assert_allclose(big, rgb.repeat(2, axis=0).repeat(2, axis=1))
    labels = upsample(np.array([[0, 3], [7, 1]]), (4, 4), nearest=True)
    assert labels.dtype.kind == "i" and set(np.unique(labels)) == {0, 1, 3, 7}


def test_overlay_outline_shows_a_red_mask_on_a_red_object():
    from vitdense import overlay

    image = np.zeros((40, 40, 3), np.uint8)
    image[..., 0] = 230  # a red object filling the picture
    mask = np.zeros((40, 40), int)
    mask[10:30, 10:30] = 1
    red = np.array([[0, 0, 0], [255, 40, 40]], np.uint8)
    plain = overlay(image, mask, 0.55, red)
    assert np.abs(plain[20, 20].astype(int) - image[20, 20]).max() < 40  # the tint alone is hard to see
    drawn = overlay(image, mask, 0.55, red, outline=2)
    assert (drawn[10, 15] == 255).all() and (drawn[9, 15] == 255).all()  # white on both sides of the edge
    assert (drawn[7, 15] == 0).all() and (drawn[12, 15] == 0).all()  # inside a black line
    np.testing.assert_array_equal(drawn[20, 20], plain[20, 20])  # the inside keeps its tint
    np.testing.assert_array_equal(drawn[0, 0], image[0, 0])  # far background untouched

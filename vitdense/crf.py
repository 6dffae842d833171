"""Dense-CRF refinement of label maps at image resolution (Krähenbühl & Koltun 2011, via pydensecrf).

Shapes: an image is (H, W, 3) uint8; per-token energies live on the token grid (h, w, L) for L labels;
unaries handed to the CRF are (L, H, W) float32 energies (lower = more likely, e.g. squared distances to
cluster centroids or −log probabilities). Labels are ints in [0, L).

Also holds GrabCut refinement of a binary mask, the refinement dino-vit-features' object co-segmentation
uses, as an alternative to the dense CRF.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CrfParams:
    """Kernels of the fully connected CRF (a Potts model with a smoothness and an appearance kernel).

    Defaults are those of dino-vit-features' part co-segmentation (Amir et al. 2021): smoothness kernel
    sxy 3 weight 50, appearance kernel sxy 5 / srgb 13 weight 15, 10 mean-field iterations. With
    squared-distance unaries (range [0, 4] for unit descriptors) these weights make the CRF a local,
    edge-aware clean-up of the upsampled token labels rather than a global re-segmentation.
    """

    iterations: int = 10
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 50.0
    bilateral_sxy: float = 5.0
    bilateral_srgb: float = 13.0
    bilateral_compat: float = 15.0


def dense_crf(image: np.ndarray, unary: np.ndarray, params: CrfParams = CrfParams()) -> np.ndarray:
    """Mean-field inference of a dense CRF → marginals (L, H, W) float32.

    image: (H, W, 3) uint8 (the appearance kernel compares these colours); unary: (L, H, W) energies.
    """
    import pydensecrf.densecrf as dcrf

    n_labels, hgt, wid = unary.shape
    img = np.array(np.asarray(image, dtype=np.uint8)[..., :3], order="C")  # writable copy: pydensecrf insists
    assert img.shape[:2] == (hgt, wid), (img.shape, unary.shape)
    crf = dcrf.DenseCRF2D(wid, hgt, n_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary.reshape(n_labels, -1), dtype=np.float32))
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat, kernel=dcrf.DIAG_KERNEL,
                            normalization=dcrf.NORMALIZE_SYMMETRIC)
    crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb, rgbim=img,
                             compat=params.bilateral_compat, kernel=dcrf.DIAG_KERNEL,
                             normalization=dcrf.NORMALIZE_SYMMETRIC)
    marginals = np.asarray(crf.inference(params.iterations), dtype=np.float32)
    return marginals.reshape(n_labels, hgt, wid)


def upsample_energies(energies: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Token-grid energies (h, w, L) → (L, H, W), nearest-neighbour (each token covers its block of pixels)."""
    import torch
    import torch.nn.functional as F

    grid = torch.from_numpy(np.ascontiguousarray(energies, dtype=np.float32)).permute(2, 0, 1)[None]
    return F.interpolate(grid, size=size, mode="nearest")[0].numpy()


def crf_labels(image: np.ndarray, energies: np.ndarray, params: CrfParams | None = CrfParams()) -> np.ndarray:
    """Labels (H, W) int64 of an image from token-grid energies (h, w, L), refined by a dense CRF.

    The energies are upsampled to the image's (H, W) by nearest neighbour; with ``params=None`` no CRF
    runs and the result is the per-pixel argmin of the upsampled energies.
    """
    unary = upsample_energies(energies, tuple(np.asarray(image).shape[:2]))
    if params is None or unary.shape[0] < 2:
        return unary.argmin(axis=0)
    # A constant per pixel does not change the CRF; subtracting the max keeps energies in a small range.
    unary -= unary.max(axis=0, keepdims=True)
    return dense_crf(image, unary, params).argmax(axis=0)


def mask_energies(mask: np.ndarray, confidence: float = 0.7) -> np.ndarray:
    """Binary mask or foreground probability (H, W) → energies (H, W, 2) [background, foreground].

    A hard mask is read as probability ``confidence`` of its label (as pydensecrf's ``unary_from_labels``
    with gt_prob); soft values p in [0, 1] are squeezed into [1 − confidence, confidence]. Energy = −log p.
    """
    prob = np.asarray(mask, dtype=np.float32)
    prob = (1 - confidence) + prob * (2 * confidence - 1)
    return -np.log(np.stack([1 - prob, prob], axis=-1))


def refine_mask(image: np.ndarray, mask: np.ndarray, confidence: float = 0.7,
                params: CrfParams = CrfParams(gaussian_compat=3.0, bilateral_sxy=20.0, bilateral_compat=10.0)
                ) -> np.ndarray:
    """Dense-CRF clean-up of a binary mask or probability map (H, W) on its image → bool (H, W).

    Energies from :func:`mask_energies`; default kernels are the common ones for −log p unaries
    (smoothness weight 3, appearance sxy 20 / srgb 13 weight 10), weaker than :class:`CrfParams`' defaults
    because those unaries are on a larger scale than squared descriptor distances.
    """
    return crf_labels(image, mask_energies(mask, confidence), params).astype(bool)


def grabcut_mask(image: np.ndarray, mask: np.ndarray, erode: int = 7, iterations: int = 5) -> np.ndarray:
    """GrabCut refinement of a binary mask (H, W) on its image (H, W, 3) → bool (H, W).

    As dino-vit-features' object co-segmentation: the mask eroded by ``erode`` × ``erode`` is certain
    foreground, the eroded complement certain background, the band between them is left to GrabCut's colour
    models. An empty or full mask is returned unchanged (GrabCut needs both classes). Deterministic
    (the reference is not: it leaves OpenCV's random generator where earlier calls left it).
    """
    import cv2

    mask = np.asarray(mask, dtype=bool)
    if mask.all() or not mask.any():
        return mask.copy()
    kernel = np.ones((erode, erode), np.uint8)
    sure_fg = cv2.erode(mask.astype(np.uint8), kernel).astype(bool)
    sure_bg = cv2.erode((~mask).astype(np.uint8), kernel).astype(bool)
    labels = np.full(mask.shape, cv2.GC_PR_FGD, np.uint8)
    labels[sure_bg] = cv2.GC_BGD
    labels[sure_fg] = cv2.GC_FGD
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)  # GrabCut's k-means draws from OpenCV's global generator: the same mask every run
    try:
        cv2.grabCut(np.ascontiguousarray(np.asarray(image, np.uint8)[..., :3]), labels, None, bgd, fgd,
                    iterations, cv2.GC_INIT_WITH_MASK)
    except cv2.error:  # degenerate colour statistics (e.g. a flat image): keep the input
        return mask.copy()
    return (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)

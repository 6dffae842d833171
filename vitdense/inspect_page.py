"""The inspect page: one self-contained HTML file in which hovering or clicking a point of any image shows, in
every image, the cosine similarity of that point's descriptor to every token, its nearest neighbour there
and whether the two are best buddies (the interactive view of dino-vit-features' ``inspect_similarity.py``,
without a desktop window: it opens from disk, needs no server or network, and runs in a notebook's output).

Shapes:
    I  images     T_i  tokens of image i on its (h_i, w_i) grid     N = sum of T_i     D  descriptor channels
    K  dimensions kept by the compression (``dims``)

Compression. The page shows cosine similarities only, so descriptors are L2-normalised first, then projected
on the top K right singular vectors of the (N, D) matrix of every image's unit descriptors (an uncentred
PCA: it keeps the directions of most energy, the mean direction included, which centring would remove and
a cosine needs), then each of the K coordinates is quantised to 8 bits on its own [min, max] range. The
page dequantises, renormalises every token once and answers a click with one (N, K) × (K,) product: the
cosine similarity of the compressed vectors. :func:`similarity_error` measures how far that is from the
cosine of the full descriptors; the page reports it in its footer. Nearest neighbours and best buddies are
computed here from the full descriptors and travel as index tables, so they are exact.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from .errors import ConfigError

DEFAULT_DIMS = 128


@dataclass
class CompressedDescriptors:
    """Descriptors of N tokens as K uint8 codes each: value = offset + code * step, per dimension.

    codes: (N, K) uint8; offset, step: (K,) float32; components: (D, K) float32, the projection of unit
    descriptors; energy: fraction of the unit descriptors' squared norm the K components keep.
    """

    codes: np.ndarray
    offset: np.ndarray
    step: np.ndarray
    components: np.ndarray
    energy: float

    @property
    def dims(self) -> int:
        return self.codes.shape[1]

    def vectors(self) -> np.ndarray:
        """(N, K) float32 dequantised, unit-length rows: what the page computes similarities with."""
        vec = self.offset[None].astype(np.float64) + self.codes * self.step[None].astype(np.float64)
        norm = np.linalg.norm(vec, axis=1, keepdims=True)
        return (vec / np.where(norm > 0, norm, 1)).astype(np.float32)


def _tensor(desc: np.ndarray | torch.Tensor) -> torch.Tensor:
    return desc.detach().cpu() if isinstance(desc, torch.Tensor) else torch.from_numpy(np.asarray(desc))


def _unit(desc: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, D) float64 rows of unit length."""
    return torch.nn.functional.normalize(_tensor(desc).double(), dim=-1)


def compress_descriptors(descriptors: np.ndarray | torch.Tensor, dims: int = DEFAULT_DIMS) -> CompressedDescriptors:
    """Compress (N, D) descriptors for cosine similarity: unit rows, uncentred PCA to ``dims`` dimensions (at
    most D and N), 8-bit quantisation per dimension (see the module docstring)."""
    if dims < 1:
        raise ConfigError.argument("dims", dims, "must be at least 1")
    unit = _unit(descriptors).numpy()  # (N, D) float64
    n, d = unit.shape
    k = min(dims, d, n)
    gram = unit.T @ unit  # (D, D): its eigenvectors are the right singular vectors of the unit descriptors
    # numpy, not torch: torch's eigh of a small matrix can take ~1 s on a busy multi-threaded CPU, numpy ~1 ms
    evals, evecs = np.linalg.eigh(gram)
    comps = evecs[:, -k:][:, ::-1]  # largest first
    # Fix each component's sign (the largest entry positive) so pages do not change between runs.
    signs = np.sign(comps[np.abs(comps).argmax(axis=0), np.arange(k)])
    comps = comps * np.where(signs == 0, 1.0, signs)
    energy = float(evals[-k:].sum() / max(float(evals.sum()), 1e-30))
    proj = unit @ comps  # (N, K)
    lo, hi = proj.min(axis=0), proj.max(axis=0)
    step = ((hi - lo) / 255.0).astype(np.float32)
    step[step <= 0] = 1.0
    offset = lo.astype(np.float32)
    codes = np.clip(np.round((proj - offset) / step), 0, 255).astype(np.uint8)
    return CompressedDescriptors(codes, offset, step, comps.astype(np.float32), energy)


@dataclass
class SimilarityError:
    """|cosine of compressed vectors - cosine of full descriptors| over ``pairs`` token pairs (``queries``
    query tokens against all N tokens): mean and max."""

    mean: float
    max: float
    pairs: int
    queries: int

    def as_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "max": self.max, "pairs": self.pairs, "queries": self.queries}


def similarity_error(descriptors: np.ndarray | torch.Tensor, compressed: CompressedDescriptors, queries: int = 512,
                     seed: int = 0) -> SimilarityError:
    """Error of the compressed cosine similarity against the full descriptors' for ``queries`` random query
    tokens (all tokens when N <= queries) against every token. Memory: (queries, N) floats, in blocks of
    256 queries."""
    unit = _unit(descriptors).float()
    vec = torch.from_numpy(compressed.vectors())
    n = unit.shape[0]
    rows = np.arange(n) if n <= queries else np.sort(np.random.default_rng(seed).choice(n, queries, replace=False))
    total, worst = 0.0, 0.0
    for start in range(0, len(rows), 256):
        idx = torch.from_numpy(rows[start:start + 256])
        diff = (unit[idx] @ unit.T - vec[idx] @ vec.T).abs()
        total += float(diff.double().sum())
        worst = max(worst, float(diff.max()))
    pairs = len(rows) * n
    return SimilarityError(total / pairs, worst, pairs, len(rows))


# ------------------------------------------------------------------------------------------- the page

@dataclass
class InspectImage:
    """One image of the page: name (caption), image (H, W, 3) uint8 as fed to the network, grid (h, w),
    saliency (T,) in [0, 1] or None."""

    name: str
    image: np.ndarray
    grid: tuple[int, int]
    saliency: np.ndarray | None = None


@dataclass
class InspectView:
    """One descriptor choice of the page's selector: label (e.g. "key, layer 11") and per image (T_i, D)."""

    label: str
    descriptors: list[np.ndarray | torch.Tensor]


@dataclass
class InspectPage:
    """The page's HTML (a complete document; ``fragment`` is the part a notebook embeds) and its report:
    settings, per view the compression and its similarity error, the page's size in bytes."""

    html: str
    fragment: str
    report: dict[str, Any] = field(default_factory=dict)


def _data_uri(image: np.ndarray, fmt: str = "PNG", quality: int = 90) -> str:
    from PIL import Image

    buf = io.BytesIO()
    options = {"quality": quality} if fmt == "JPEG" else {}
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format=fmt, **options)
    mime = "image/jpeg" if fmt == "JPEG" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def colormap_lut() -> np.ndarray:
    """(256, 3) uint8 'inferno': luminance rises with the value, so the brightest pixel is the most similar."""
    import matplotlib

    return (matplotlib.colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)


def _nn_tables(descs: list[torch.Tensor]) -> tuple[dict[str, str], str]:
    """Exact nearest neighbour of every token of image i in image j (i != j), as base64 little-endian
    uint16 (uint32 for grids over 65535 tokens) under key "i,j"."""
    from .correspond import nearest_neighbours

    dtype = np.dtype("<u2") if max(d.shape[0] for d in descs) <= 65535 else np.dtype("<u4")
    tables = {}
    for i in range(len(descs)):
        for j in range(i + 1, len(descs)):
            nn = nearest_neighbours(descs[i], descs[j], normalized=True)
            tables[f"{i},{j}"] = _b64(nn.nn_ab.cpu().numpy().astype(dtype))
            tables[f"{j},{i}"] = _b64(nn.nn_ba.cpu().numpy().astype(dtype))
    return tables, "uint16" if dtype.itemsize == 2 else "uint32"


def build_inspect_page(images: Sequence[InspectImage], views: Sequence[InspectView], patch: int, stride: int,
                       dims: int = DEFAULT_DIMS, error_queries: int = 512, title: str = "vitdense inspect",
                       info: dict[str, Any] | None = None, min_display: int = 256) -> InspectPage:
    """The inspect page of ``images`` with one selector entry per view.

    patch, stride: of the extractor, to place each token's cell (token (r, c) is centred on pixel
    (r * stride + (patch - 1) / 2, ...)); dims: kept dimensions of the compression; error_queries: query
    tokens of :func:`similarity_error`; info: settings shown in the footer and returned in the report;
    min_display: images whose shorter side is smaller are shown enlarged to this many CSS pixels.
    """
    from .viz import pca_rgb

    if not images or not views:
        raise ConfigError("the inspect page needs at least one image and one descriptor choice")
    lut = colormap_lut()
    grids = [tuple(int(v) for v in im.grid) for im in images]
    page_images = []
    for im, grid in zip(images, grids):
        hgt, wid = im.image.shape[:2]
        sal = None
        if im.saliency is not None:
            sal = _data_uri(lut[np.clip(np.round(np.asarray(im.saliency) * 255), 0, 255).astype(np.uint8)]
                            .reshape(*grid, 3))
        page_images.append({"name": im.name, "src": _data_uri(im.image, "JPEG"), "size": [hgt, wid],
                            "grid": list(grid), "scale": max(1.0, min_display / min(hgt, wid)), "saliency": sal})
    page_views, report_views = [], []
    for view in views:
        assert len(view.descriptors) == len(images), (len(view.descriptors), len(images))
        descs = [_unit(d).float() for d in view.descriptors]
        for d, grid in zip(descs, grids):
            assert d.shape[0] == grid[0] * grid[1], (d.shape, grid)
        full = torch.cat(descs)
        comp = compress_descriptors(full, dims)
        err = similarity_error(full, comp, error_queries)
        tables, nn_dtype = _nn_tables(descs)
        pcas = pca_rgb([_tensor(d).float() for d in view.descriptors], grids)  # raw descriptors, as `vitdense pca`
        page_views.append({
            "label": view.label, "dims": comp.dims, "input_dims": int(full.shape[1]),
            "offset": [float(v) for v in comp.offset], "step": [float(v) for v in comp.step],
            "codes": _b64(comp.codes), "nn": tables, "nn_dtype": nn_dtype,
            "pca": [_data_uri((np.clip(p, 0, 1) * 255).round().astype(np.uint8)) for p in pcas],
            "energy": comp.energy, "error": err.as_dict()})
        report_views.append({"label": view.label, "input_dims": int(full.shape[1]), "dims": comp.dims, "bits": 8,
                             "energy": round(comp.energy, 6), "similarity_error": err.as_dict()})
    first = images[0]
    start = (int(np.argmax(first.saliency)) if first.saliency is not None
             else (grids[0][0] // 2) * grids[0][1] + grids[0][1] // 2)
    data = {"version": 1, "patch": int(patch), "stride": int(stride), "colormap": _b64(lut),
            "images": page_images, "views": page_views, "start": start}
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    root = "vd-inspect-" + hashlib.sha1(payload.encode()).hexdigest()[:10]
    info = dict(info or {})
    footer = _footer(info, report_views, len(images), sum(g[0] * g[1] for g in grids))
    fragment = (_TEMPLATE.replace("__VD_FOOTER__", footer).replace("__VD_TITLE__", html.escape(title))
                .replace("__VD_ROOT__", root).replace("__VD_DATA__", payload))
    size = len(_DOCUMENT.replace("__VD_BODY__", fragment).replace("__VD_TITLE__", html.escape(title)).encode())
    fragment = fragment.replace("__VD_SIZE__", f"{size / 1e6:.2f} MB")
    document = _DOCUMENT.replace("__VD_TITLE__", html.escape(title)).replace("__VD_BODY__", fragment)
    report = {"info": info, "images": [{"name": im.name, "size": list(im.image.shape[:2]), "grid": list(g)}
                                       for im, g in zip(images, grids)],
              "views": report_views, "page_bytes": len(document.encode()), "root_id": root}
    return InspectPage(document, fragment, report)


def _footer(info: dict[str, Any], views: list[dict[str, Any]], n_images: int, n_tokens: int) -> str:
    parts = [html.escape(f"{k}: {v}") for k, v in info.items()]
    lines = [" · ".join(parts)] if parts else []
    for v in views:
        e = v["similarity_error"]
        lines.append(html.escape(
            f"{v['label']}: {v['input_dims']} → {v['dims']} dimensions (uncentred PCA of unit descriptors, "
            f"{100 * v['energy']:.2f} % of the energy), 8 bits each; cosine-similarity error against the full "
            f"descriptors: mean {e['mean']:.4f}, max {e['max']:.4f} over {e['pairs']:,} token pairs "
            f"({e['queries']:,} query tokens × all {n_tokens:,})"))
    lines.append(f"{n_images} image(s), {n_tokens:,} tokens · page __VD_SIZE__ · nearest neighbours and best "
                 "buddies from the full descriptors · last update <span class=\"vd-ms\">–</span>")
    return "<br>".join(lines)


_DOCUMENT = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__VD_TITLE__</title></head>
<body style="margin:12px;background:#fff">
__VD_BODY__
</body></html>
"""

# The page's code: plain JS and canvas, no library. Everything is scoped under the root element's id so that
# several pages can live in one notebook. window.vitdenseInspect[root id] (and window.vitdenseInspectPage,
# the last page loaded) is the page's API, used by the browser test: query(image, token), state, views.
_TEMPLATE = r"""<div id="__VD_ROOT__" class="vd-inspect">
<style>
#__VD_ROOT__ { font: 13px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; }
#__VD_ROOT__ h1 { font-size: 16px; margin: 0 0 4px; }
#__VD_ROOT__ .vd-bar { display: flex; flex-wrap: wrap; gap: 16px; align-items: center; margin: 4px 0 10px; }
#__VD_ROOT__ .vd-images { display: flex; flex-wrap: wrap; gap: 14px; align-items: flex-start; }
#__VD_ROOT__ .vd-frame { position: relative; cursor: crosshair; user-select: none; }
#__VD_ROOT__ .vd-frame img { display: block; width: 100%; height: 100%; }
#__VD_ROOT__ .vd-frame canvas { position: absolute; left: 0; top: 0; width: 100%; height: 100%; }
#__VD_ROOT__ canvas.vd-overlay { image-rendering: pixelated; }
#__VD_ROOT__ .vd-caption { font-size: 12px; margin-top: 4px; }
#__VD_ROOT__ .vd-caption b { font-weight: 600; }
#__VD_ROOT__ .vd-buddy { color: #0a8a2a; font-weight: 600; }
#__VD_ROOT__ .vd-notbuddy { color: #b05a00; }
#__VD_ROOT__ .vd-legend { display: flex; align-items: center; gap: 6px; font-size: 12px; color: #444; }
#__VD_ROOT__ .vd-legend canvas { width: 120px; height: 10px; border: 1px solid #999; }
#__VD_ROOT__ .vd-footer { margin-top: 12px; font-size: 11px; color: #555; max-width: 1100px; }
</style>
<h1>__VD_TITLE__</h1>
<div class="vd-bar">
<label>descriptors <select class="vd-view"></select></label>
<span>show
<label><input type="radio" name="__VD_ROOT__-mode" value="similarity" checked> similarity</label>
<label><input type="radio" name="__VD_ROOT__-mode" value="pca"> PCA colours</label>
<label><input type="radio" name="__VD_ROOT__-mode" value="saliency"> saliency</label>
<label><input type="radio" name="__VD_ROOT__-mode" value="photo"> photo</label></span>
<label>opacity <input type="range" class="vd-opacity" min="0" max="100" value="75"></label>
<span class="vd-legend"><span>low</span><canvas class="vd-lut" width="256" height="1"></canvas><span>high cosine
similarity (per image)</span></span>
</div>
<div class="vd-hint" style="font-size:12px;color:#555;margin-bottom:8px">Hover over any image to see what
matches that point; click to pin the point (click it again to release). Rings: the point's nearest neighbour
in each other image, <span class="vd-buddy">green</span> when the two are best buddies (each the other's
nearest neighbour), <span class="vd-notbuddy">orange</span> when not.</div>
<div class="vd-images"></div>
<div class="vd-footer">__VD_FOOTER__</div>
<script type="application/json" class="vd-data">__VD_DATA__</script>
<script>
(function () {
  "use strict";
  var root = document.getElementById("__VD_ROOT__");
  if (!root || root.getAttribute("data-ready")) return;
  root.setAttribute("data-ready", "1");
  var data = JSON.parse(root.querySelector("script.vd-data").textContent);
  var images = data.images, views = data.views, p = data.patch, s = data.stride;

  function bytes(b64) {
    var str = atob(b64), out = new Uint8Array(str.length);
    for (var i = 0; i < str.length; i++) out[i] = str.charCodeAt(i);
    return out;
  }
  var lut = bytes(data.colormap);
  var offsets = [0];
  images.forEach(function (im) { offsets.push(offsets[offsets.length - 1] + im.grid[0] * im.grid[1]); });
  var nTotal = offsets[offsets.length - 1];

  // (N, K) dequantised vectors with unit rows, built once per view on first use.
  function vectors(view) {
    if (view._vec) return view._vec;
    var k = view.dims, codes = bytes(view.codes), off = view.offset, step = view.step;
    var vec = new Float32Array(nTotal * k);
    for (var t = 0; t < nTotal; t++) {
      var base = t * k, norm = 0;
      for (var c = 0; c < k; c++) { var v = off[c] + codes[base + c] * step[c]; vec[base + c] = v; norm += v * v; }
      norm = norm > 0 ? 1 / Math.sqrt(norm) : 0;
      for (c = 0; c < k; c++) vec[base + c] *= norm;
    }
    view._vec = vec;
    return vec;
  }
  function nnTable(view, i, j) {
    view._nn = view._nn || {};
    var key = i + "," + j;
    if (!view._nn[key]) {
      var raw = bytes(view.nn[key]);
      view._nn[key] = view.nn_dtype === "uint16" ? new Uint16Array(raw.buffer) : new Uint32Array(raw.buffer);
    }
    return view._nn[key];
  }
  function loadImage(src) { var im = new Image(); im.src = src; return im; }

  var lutCanvas = root.querySelector("canvas.vd-lut"), lctx = lutCanvas.getContext("2d");
  var strip = lctx.createImageData(256, 1);
  for (var i = 0; i < 256; i++) {
    strip.data[4 * i] = lut[3 * i]; strip.data[4 * i + 1] = lut[3 * i + 1];
    strip.data[4 * i + 2] = lut[3 * i + 2]; strip.data[4 * i + 3] = 255;
  }
  lctx.putImageData(strip, 0, 0);

  var select = root.querySelector("select.vd-view");
  views.forEach(function (v, i) {
    var o = document.createElement("option"); o.value = i; o.textContent = v.label; select.appendChild(o);
  });
  views.forEach(function (v) { v._pca = v.pca.map(loadImage); });

  var container = root.querySelector(".vd-images"), cells = [];
  images.forEach(function (im, i) {
    var H = im.size[0], W = im.size[1], h = im.grid[0], w = im.grid[1];
    var cell = document.createElement("div");
    var frame = document.createElement("div");
    frame.className = "vd-frame";
    frame.style.width = (W * im.scale) + "px"; frame.style.height = (H * im.scale) + "px";
    var photo = document.createElement("img"); photo.src = im.src; photo.alt = im.name; photo.draggable = false;
    var overlay = document.createElement("canvas");
    overlay.className = "vd-overlay"; overlay.width = W; overlay.height = H;
    var marks = document.createElement("canvas"); marks.className = "vd-marks";
    var grid = document.createElement("canvas"); grid.width = w; grid.height = h;
    var caption = document.createElement("div"); caption.className = "vd-caption";
    frame.appendChild(photo); frame.appendChild(overlay); frame.appendChild(marks);
    cell.appendChild(frame); cell.appendChild(caption); container.appendChild(cell);
    var c = {index: i, H: H, W: W, h: h, w: w, frame: frame, overlay: overlay, marks: marks, grid: grid,
             gctx: grid.getContext("2d"), caption: caption,
             saliency: im.saliency ? loadImage(im.saliency) : null};
    c.pixels = c.gctx.createImageData(w, h);
    cells.push(c);
    frame.addEventListener("mousemove", function (ev) { if (!state.locked) schedule(i, tokenAt(c, ev)); });
    frame.addEventListener("click", function (ev) {
      var t = tokenAt(c, ev);
      if (state.locked && state.image === i && state.token === t) { state.locked = false; return; }
      state.locked = true;
      query(i, t);
    });
  });

  // Token (r, c) covers pixels [r*s, r*s + p); its cell is the s x s square around the patch centre.
  var x0 = (p - s) / 2;
  function tokenAt(c, ev) {
    var rect = c.frame.getBoundingClientRect();
    var x = (ev.clientX - rect.left) / rect.width * c.W, y = (ev.clientY - rect.top) / rect.height * c.H;
    var col = Math.min(c.w - 1, Math.max(0, Math.floor((x - x0) / s)));
    var row = Math.min(c.h - 1, Math.max(0, Math.floor((y - x0) / s)));
    return row * c.w + col;
  }
  function centre(c, t) {  // token centre in image pixels (edges at integers)
    return [(t % c.w) * s + p / 2, Math.floor(t / c.w) * s + p / 2];
  }

  var state = {view: 0, mode: "similarity", image: -1, token: -1, locked: false, sims: [], nn: [], buddy: [],
               ms: NaN, opacity: 0.75};
  var pending = null;
  function schedule(i, t) {
    if (state.image === i && state.token === t) return;
    var first = pending === null;
    pending = [i, t];
    if (first) requestAnimationFrame(function () { var q = pending; pending = null; query(q[0], q[1]); });
  }

  function drawOverlay(c) {
    var ctx = c.overlay.getContext("2d");
    ctx.clearRect(0, 0, c.W, c.H);
    ctx.imageSmoothingEnabled = false;
    var src = null;
    if (state.mode === "similarity" && state.sims.length) src = c.grid;
    else if (state.mode === "pca") src = views[state.view]._pca[c.index];
    else if (state.mode === "saliency") src = c.saliency;
    if (src && (src.tagName !== "IMG" || src.complete)) ctx.drawImage(src, x0, x0, c.w * s, c.h * s);
    else if (src) src.onload = function () { drawOverlay(c); };
    c.overlay.style.opacity = state.mode === "photo" ? 0 : state.opacity;
  }
  function paintSimilarity(c, sims) {  // per-image min-max, inferno colours, into the (h, w) grid canvas
    var lo = Infinity, hi = -Infinity, n = sims.length, px = c.pixels.data;
    for (var t = 0; t < n; t++) { if (sims[t] < lo) lo = sims[t]; if (sims[t] > hi) hi = sims[t]; }
    var scale = hi > lo ? 255 / (hi - lo) : 0;
    for (t = 0; t < n; t++) {
      var idx = Math.round((sims[t] - lo) * scale) * 3;
      px[4 * t] = lut[idx]; px[4 * t + 1] = lut[idx + 1]; px[4 * t + 2] = lut[idx + 2]; px[4 * t + 3] = 255;
    }
    c.gctx.putImageData(c.pixels, 0, 0);
  }
  function drawMarks(c) {
    var rect = c.frame.getBoundingClientRect(), dpr = window.devicePixelRatio || 1;
    c.marks.width = Math.round(rect.width * dpr); c.marks.height = Math.round(rect.height * dpr);
    var ctx = c.marks.getContext("2d"), k = c.marks.width / c.W;
    ctx.clearRect(0, 0, c.marks.width, c.marks.height);
    var t = c.index === state.image ? state.token : state.nn[c.index];
    if (t === undefined || t < 0) return;
    var xy = centre(c, t), x = xy[0] * k, y = xy[1] * k, r = Math.max(6 * dpr, 0.9 * s * k);
    function ring(radius, colour) {
      ctx.strokeStyle = colour; ctx.beginPath(); ctx.arc(x, y, radius, 0, 2 * Math.PI); ctx.stroke();
    }
    ctx.lineWidth = 2.5 * dpr;
    ring(r + 1.5 * dpr, "#000");  // a dark edge keeps the ring visible on bright colours
    if (c.index === state.image) {  // the query point: a white ring with a crosshair
      ring(r, "#fff");
      ctx.beginPath();
      ctx.moveTo(x - 2 * r, y); ctx.lineTo(x - r, y); ctx.moveTo(x + r, y); ctx.lineTo(x + 2 * r, y);
      ctx.moveTo(x, y - 2 * r); ctx.lineTo(x, y - r); ctx.moveTo(x, y + r); ctx.lineTo(x, y + 2 * r);
      ctx.stroke();
    } else {
      ring(r, state.buddy[c.index] ? "#2bd34f" : "#ff9a1f");
    }
  }
  function caption(c) {
    var im = images[c.index], txt = "<b>" + escapeHtml(im.name) + "</b>";
    if (state.image >= 0) {
      if (c.index === state.image) {
        var xy = centre(c, state.token);
        txt += " · point (" + (xy[0] - 0.5).toFixed(1) + ", " + (xy[1] - 0.5).toFixed(1) + ")" +
               (state.locked ? " pinned" : "");
      } else {
        var t = state.nn[c.index], nxy = centre(c, t), sim = state.sims[c.index][t];
        txt += " · nearest neighbour (" + (nxy[0] - 0.5).toFixed(1) + ", " + (nxy[1] - 0.5).toFixed(1) +
               "), cosine " + sim.toFixed(3) + " · " + (state.buddy[c.index] ?
               "<span class=\"vd-buddy\">best buddy</span>" : "<span class=\"vd-notbuddy\">not a best buddy</span>");
      }
    }
    c.caption.innerHTML = txt;
  }
  function escapeHtml(str) {
    var entities = {"&": "&amp;", "<": "&lt;", ">": "&gt;", "\"": "&quot;"};
    return String(str).replace(/[&<>"]/g, function (ch) { return entities[ch]; });
  }

  // Similarity of token `token` of image `image` to every token of every image, nearest neighbours, drawing.
  function query(image, token) {
    var start = performance.now();
    var view = views[state.view], vec = vectors(view), k = view.dims;
    var qbase = (offsets[image] + token) * k, q = vec.subarray(qbase, qbase + k);
    var sims = [], nn = [], buddy = [];
    for (var j = 0; j < images.length; j++) {
      var n = offsets[j + 1] - offsets[j], out = new Float32Array(n), base = offsets[j] * k;
      for (var t = 0; t < n; t++, base += k) {
        var acc = 0;
        for (var c = 0; c < k; c++) acc += q[c] * vec[base + c];
        out[t] = acc;
      }
      sims.push(out);
      if (j === image) { nn.push(token); buddy.push(true); continue; }
      var b = nnTable(view, image, j)[token];
      nn.push(b); buddy.push(nnTable(view, j, image)[b] === token);
    }
    state.image = image; state.token = token; state.sims = sims; state.nn = nn; state.buddy = buddy;
    cells.forEach(function (cell) {
      paintSimilarity(cell, sims[cell.index]); drawOverlay(cell); drawMarks(cell); caption(cell);
    });
    state.ms = performance.now() - start;
    var msEl = root.querySelector(".vd-ms");
    if (msEl) msEl.textContent = state.ms.toFixed(1) + " ms";
    return state;
  }
  function redraw() {
    cells.forEach(function (cell) { drawOverlay(cell); drawMarks(cell); caption(cell); });
  }

  select.addEventListener("change", function () {
    state.view = +select.value;
    if (state.image >= 0) query(state.image, state.token); else redraw();
  });
  root.querySelectorAll("input[type=radio]").forEach(function (el) {
    el.addEventListener("change", function () { if (el.checked) { state.mode = el.value; redraw(); } });
  });
  root.querySelector("input.vd-opacity").addEventListener("input", function (ev) {
    state.opacity = ev.target.value / 100; redraw();
  });
  window.addEventListener("resize", function () { cells.forEach(drawMarks); });

  var api = {root: root, state: state, views: views.map(function (v) { return v.label; }), images: images,
             query: query,
             setView: function (i) { select.value = i; select.dispatchEvent(new Event("change")); },
             setMode: function (m) { var el = root.querySelector("input[value=" + m + "]"); el.checked = true;
                                     el.dispatchEvent(new Event("change")); },
             time: function (image, token, repeats) {  // median ms of `repeats` queries (a benchmark helper)
               var times = [];
               for (var r = 0; r < (repeats || 20); r++) { query(image, token); times.push(state.ms); }
               times.sort(function (a, b) { return a - b; });
               return times[Math.floor(times.length / 2)];
             }};
  window.vitdenseInspect = window.vitdenseInspect || {};
  window.vitdenseInspect["__VD_ROOT__"] = api;
  window.vitdenseInspectPage = api;

  query(0, data.start);  // the most salient point of the first image (its centre without saliency), not pinned
})();
</script>
</div>
"""

"""`vitdense inspect` end to end, in a real browser: headless Chromium (Debian's chromium + chromium-driver,
driven by selenium) opens the page from disk, a click shows the cosine similarity that Python computes from
the full descriptors (within the error the page reports), the drawn heat map is that similarity, the rings
are the exact nearest neighbours. Bad input is one line and nothing written."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import assert_user_error, run_cli, save_tiny_weights

from vitdense import ViTExtractor, pca_rgb
from vitdense.correspond import pixel_to_token
from vitdense.inspect_page import colormap_lut

FAST = ["--device", "cpu", "--load-size", "0"]
SIZES = {"chelsea": (72, 56), "coffee": (64, 48)}  # (W, H): 13 x 17 and 11 x 15 tokens at stride 4


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_tiny_weights(tmp_path_factory.mktemp("w") / "tiny.safetensors", depth=4)


@pytest.fixture(scope="module")
def images(tmp_path_factory, photos):
    folder = tmp_path_factory.mktemp("imgs")
    for name, size in SIZES.items():
        Image.fromarray(photos[name]).resize(size, Image.LANCZOS).save(folder / f"{name}.png")
    return [folder / f"{name}.png" for name in SIZES]


@pytest.fixture(scope="module")
def page(tmp_path_factory, images, weights):
    out = tmp_path_factory.mktemp("page") / "page.html"
    result = run_cli("inspect", *images, "--out", out, "--weights", weights, "--facets", "key,token",
                     "--layers", "2,3", "--dims", "24", *FAST)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def browser():
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,900", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


def _full_descriptors(weights, images, facet, layer):
    extractor = ViTExtractor(weights=weights, stride=4, device="cpu")
    out = []
    for path in images:
        batch, _ = extractor.preprocess(path)
        out.append(extractor.extract(batch, [layer], facet).descriptors[layer][0].numpy().astype(np.float64))
    return out


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _canvas(driver, index, selector="canvas.vd-overlay"):
    """RGBA pixels (H, W, 4) of a canvas of image ``index`` as the browser holds them."""
    flat = driver.execute_script(
        "var c = arguments[0].querySelectorAll(arguments[2])[arguments[1]];"
        "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);",
        driver.find_element("css selector", ".vd-inspect"), index, selector)
    hgt, wid = [int(v) for v in driver.execute_script(
        "var c = document.querySelectorAll(arguments[1])[arguments[0]]; return [c.height, c.width];", index, selector)]
    return np.array(flat, dtype=np.uint8).reshape(hgt, wid, 4)


def _cell_centre_pixels(grid, patch=8, stride=4):
    """(T, 2) integer pixel (y, x) inside each token's cell, at its patch centre."""
    rows, cols = np.divmod(np.arange(grid[0] * grid[1]), grid[1])
    return np.stack([rows * stride + patch // 2, cols * stride + patch // 2], axis=1)


def test_inspect_page_in_browser(page, images, weights, browser):
    from selenium.webdriver.common.action_chains import ActionChains

    report = json.loads(page.with_suffix(".json").read_text())
    labels = [v["label"] for v in report["views"]]
    assert labels == ["key, layer 2", "key, layer 3", "token, layer 2", "token, layer 3"]
    assert report["page_bytes"] == page.stat().st_size
    browser.get(page.resolve().as_uri())
    api = "return window.vitdenseInspectPage"
    assert browser.execute_script(api + ".views") == labels
    browser.execute_script("window.vitdenseInspectPage.setView(2)")  # token, layer 2
    view = report["views"][2]
    err = view["similarity_error"]
    grids = [tuple(e["grid"]) for e in report["images"]]
    sizes = [tuple(e["size"]) for e in report["images"]]
    assert grids == [(13, 17), (11, 15)] and sizes == [(56, 72), (48, 64)]
    assert err["queries"] == 13 * 17 + 11 * 15  # every token was a query: the reported max is over all pairs

    # click a chosen token of image 0 at its patch centre
    frames = browser.find_elements("css selector", ".vd-frame")
    target = 5 * grids[0][1] + 11
    y, x = np.array(divmod(target, grids[0][1])) * 4 + 3.5  # patch centre (row * s + (p - 1) / 2), pixels
    rect = browser.execute_script("var r = arguments[0].getBoundingClientRect(); return [r.width, r.height];",
                                  frames[0])
    scale = rect[0] / sizes[0][1]
    dx, dy = round((x + 0.5) * scale - rect[0] / 2), round((y + 0.5) * scale - rect[1] / 2)
    token = int(pixel_to_token(np.array([[(dy + rect[1] / 2) / scale - 0.5, (dx + rect[0] / 2) / scale - 0.5]]),
                               grids[0], 4, 8, sizes[0], sizes[0])[0])
    assert token == target
    ActionChains(browser).move_to_element_with_offset(frames[0], dx, dy).click().perform()
    state = browser.execute_script("var s = window.vitdenseInspectPage.state; return {image: s.image, token: s.token,"
                                   " locked: s.locked, view: s.view, ms: s.ms, nn: s.nn, buddy: s.buddy,"
                                   " sims: s.sims.map(function (a) { return Array.from(a); })};")
    assert (state["image"], state["token"], state["locked"], state["view"]) == (0, target, True, 2)

    # the similarities against Python's full-precision cosine, within the reported error
    full = [_unit(d) for d in _full_descriptors(weights, images, "token", 2)]
    query = full[0][target]
    for j in range(2):
        expected = full[j] @ query
        got = np.array(state["sims"][j])
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= err["max"] + 1e-5
    # exact nearest neighbour and best buddy, from the full descriptors
    nn = int(np.argmax(full[1] @ query))
    assert state["nn"][1] == nn
    assert state["buddy"][1] == (int(np.argmax(full[0] @ full[1][nn])) == target)

    # the drawn heat map of image 1: each cell's colour is its similarity's level, brightest at the maximum
    lut = colormap_lut()
    level_of = {tuple(c): i for i, c in enumerate(lut)}
    pixels = _canvas(browser, 1)
    assert pixels.shape[:2] == sizes[1] and (pixels[..., 3][4:-4, 4:-4] == 255).all()
    centres = _cell_centre_pixels(grids[1])
    levels = np.array([level_of[tuple(pixels[y, x, :3])] for y, x in centres])
    sims = np.array(state["sims"][1])
    np.testing.assert_array_equal(levels, np.round((sims - sims.min()) / (sims.max() - sims.min()) * 255))
    luminance = pixels[..., :3].astype(float) @ [0.299, 0.587, 0.114]
    by, bx = np.unravel_index(np.argmax(luminance), luminance.shape)
    bright_token = int(pixel_to_token(np.array([[by, bx]]), grids[1], 4, 8, sizes[1], sizes[1])[0])
    assert levels[bright_token] == 255
    py_best = int(np.argmax(full[1] @ query))
    assert sims[bright_token] >= sims.max() - 1e-6
    assert (full[1] @ query)[bright_token] >= (full[1] @ query)[py_best] - 2 * err["max"] - 1e-5

    # toggles: PCA colours and saliency are the pictures Python makes
    browser.execute_script("window.vitdenseInspectPage.setMode('pca')")
    pca = pca_rgb(_full_descriptors(weights, images, "token", 2), grids)
    pixels = _canvas(browser, 0)
    centres = _cell_centre_pixels(grids[0])
    expected = (np.clip(pca[0], 0, 1) * 255).round().astype(np.uint8).reshape(-1, 3)
    assert np.abs(pixels[centres[:, 0], centres[:, 1], :3].astype(int) - expected).max() <= 1  # float rounding
    browser.execute_script("window.vitdenseInspectPage.setMode('saliency')")
    extractor = ViTExtractor(weights=weights, stride=4, device="cpu")
    sal = extractor.extract(extractor.preprocess(images[1])[0], [], saliency=True).saliency[0].numpy()
    pixels = _canvas(browser, 1)
    centres1 = _cell_centre_pixels(grids[1])
    np.testing.assert_array_equal(pixels[centres1[:, 0], centres1[:, 1], :3], lut[np.round(sal * 255).astype(int)])
    browser.execute_script("window.vitdenseInspectPage.setMode('similarity')")

    # hovering: release the pin, move over image 1, the query follows the mouse
    ActionChains(browser).move_to_element_with_offset(frames[0], dx, dy).click().perform()
    assert browser.execute_script(api + ".state.locked") is False
    ActionChains(browser).move_to_element_with_offset(frames[1], 0, 0).perform()
    browser.execute_script("return new Promise(function (r) { requestAnimationFrame(function () { r(); }); })")
    assert browser.execute_script(api + ".state.image") == 1

    # click latency (compute + draw), reported not asserted
    ms = browser.execute_script("return window.vitdenseInspectPage.time(0, arguments[0], 25)", target)
    print(f"\nclick latency in headless Chromium, {sum(g[0] * g[1] for g in grids)} tokens: {ms:.2f} ms")


def test_two_pages_in_one_document(tmp_path, page, browser):
    """As in a notebook, where each output is a fragment of one document: the pages do not interfere."""
    from vitdense.inspect_page import InspectImage, InspectView, build_inspect_page

    rng = np.random.default_rng(0)
    other = build_inspect_page([InspectImage("x", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), (7, 7))],
                               [InspectView("v", [rng.normal(size=(49, 8))])], patch=8, stride=4, dims=4)
    first = page.read_text()
    body = first[first.index('<div id="vd-inspect-'):first.rindex("</body>")]
    host = tmp_path / "notebook.html"
    host.write_text(f"<!DOCTYPE html><html><body><div>{body}</div><div>{other.fragment}</div></body></html>")
    browser.get(host.resolve().as_uri())
    pages = browser.execute_script("return Object.keys(window.vitdenseInspect)")
    assert len(pages) == 2
    ids = browser.execute_script("return Object.keys(window.vitdenseInspect).map(function (k) {"
                                 " return window.vitdenseInspect[k].images.length; })")
    assert sorted(ids) == [1, 2]
    key = other.report["root_id"]
    tokens = ("return Object.keys(window.vitdenseInspect).map(function (k) {"
              " return [k, window.vitdenseInspect[k].state.token]; })")
    before = dict(browser.execute_script(tokens))
    target = 30 if before[key] != 30 else 31
    browser.execute_script("window.vitdenseInspect[arguments[0]].query(0, arguments[1])", key, target)
    after = dict(browser.execute_script(tokens))
    assert after[key] == target
    assert {k: t for k, t in after.items() if k != key} == {k: t for k, t in before.items() if k != key}


def test_inspect_bad_input(tmp_path, images, weights):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 broken")
    out = tmp_path / "page.html"
    assert_user_error(run_cli("inspect", images[0], bad, "--out", out, "--weights", weights, *FAST), str(bad))
    assert_user_error(run_cli("inspect", *images, "--out", out, "--weights", weights, "--facets", "key,nose",
                              *FAST), "--facets")
    assert_user_error(run_cli("inspect", *images, "--out", out, "--weights", weights, "--layers", "2,7", *FAST),
                      "--layer 7")
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    assert_user_error(run_cli("inspect", *images, "--out", blocker / "page.html", "--weights", weights, *FAST),
                      "cannot be written")
    assert_user_error(run_cli("inspect", *images, "--out", tmp_path, "--weights", weights, *FAST), "folder")
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jpg", "file.txt"]

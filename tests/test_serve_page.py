"""The search page of `vitdense serve` in a real browser (Debian's headless chromium driven by selenium) against a
real uvicorn server on 127.0.0.1: upload a query, see the grid, click a result to search from it, ask "why" and
see the correspondence picture, click a point for the heat map, all at desktop and at phone width; and the
command itself in a subprocess, reloading on SIGHUP."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

from conftest import save_tiny_weights  # noqa: E402
from test_serve import NAMES, _photo_files, build_index, make_service  # noqa: E402
from vitdense.serve import create_app  # noqa: E402

SCREENSHOT_DIR = os.environ.get("VITDENSE_SCREENSHOTS")  # keep the screenshots there to look at them


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def index(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("page")
    weights = save_tiny_weights(root / "tiny.safetensors", depth=2)
    files = _photo_files(root / "collection", photos)
    build_index(root / "collection", root / "index", weights)
    return {"root": root, "index": root / "index", "files": files, "weights": weights}


@pytest.fixture(scope="module")
def server(index):
    service = make_service(index["index"])
    port = _free_port()
    config = uvicorn.Config(create_app(service, watch=False), host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="vitdense-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--no-first-run",
                f"--user-data-dir={profile}", "--window-size=1280,1000", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _wait(driver, script: str, timeout: float = 30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: d.execute_script(script))


def _shot(driver, tmp_path: Path, name: str) -> np.ndarray:
    path = Path(SCREENSHOT_DIR or tmp_path) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    return np.asarray(Image.open(path).convert("RGB"))


def test_search_page_in_a_browser(server, index, browser, tmp_path):
    browser.set_window_size(1280, 1000)
    browser.get(server + "/")
    _wait(browser, "return document.getElementById('about').textContent.includes('5 images')")
    query = index["files"][1]  # coffee
    browser.find_element("id", "file").send_keys(str(query))
    _wait(browser, "return document.body.dataset.results === '5'")
    names = browser.execute_script("return Array.from(document.querySelectorAll('#grid .hit .name'))"
                                   ".map(e => e.textContent)")
    scores = browser.execute_script("return window.vitdenseServe.state.results.map(h => h.score)")
    assert names[0] == "coffee.png" and scores == sorted(scores, reverse=True)  # the query's own image first
    _wait(browser, "return Array.from(document.querySelectorAll('#grid img')).every(i => i.complete && "
                   "i.naturalWidth > 0)")  # every thumbnail loaded
    # click a result: search from it (by id)
    first = browser.find_elements("css selector", "#grid .hit")[1]
    clicked = first.find_element("css selector", ".name").text
    first.find_element("css selector", "img").click()
    _wait(browser, f"return document.getElementById('query-caption').textContent === {json.dumps(clicked)} && "
                   "document.body.dataset.results === '4' && !document.body.dataset.busy")
    assert clicked not in browser.execute_script(
        "return Array.from(document.querySelectorAll('#grid .hit .name')).map(e => e.textContent)")
    # "why": the correspondence picture between the query and a result
    browser.find_elements("css selector", "#grid .hit button.why")[0].click()
    _wait(browser, "var i = document.getElementById('why-img'); return document.body.dataset.why && i.complete "
                   "&& i.naturalWidth > 0")
    record = browser.execute_script("return window.vitdenseServe.state.why.record")
    nat = browser.execute_script("var i = document.getElementById('why-img'); return [i.naturalHeight, i.naturalWidth]")
    assert nat == record["picture_size"] and record["pairs"]
    # a click in the query's half shows the heat map
    why = browser.find_element("id", "why-img")
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(browser).move_to_element_with_offset(why, -why.size["width"] // 4, 0).click().perform()
    _wait(browser, "var i = document.getElementById('heat-img'); return document.body.dataset.heat && "
                   "!i.hidden && i.complete && i.naturalWidth > 0")
    shot = _shot(browser, tmp_path, "serve_desktop.png")
    assert shot.std() > 20  # not a blank page
    assert browser.execute_script("return document.getElementById('status').className") != "error"
    # phone width: no horizontal scrolling, two result columns
    browser.set_window_size(390, 844)
    time.sleep(0.2)
    width = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], width
    cols = browser.execute_script("return getComputedStyle(document.getElementById('grid'))"
                                  ".gridTemplateColumns.split(' ').length")
    assert cols == 2
    _shot(browser, tmp_path, "serve_phone.png")


def test_page_reports_a_refused_upload(server, browser, tmp_path):
    browser.set_window_size(1280, 1000)
    browser.get(server + "/")
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"definitely not a png")
    browser.find_element("id", "file").send_keys(str(bad))
    _wait(browser, "return document.getElementById('status').className === 'error'")
    assert "not an image" in browser.find_element("id", "status").text


def test_command_serves_and_reloads_on_sighup(index, photos, tmp_path):
    """`vitdense serve` in its own process: answers on 127.0.0.1, and SIGHUP loads a new generation."""
    coll = tmp_path / "coll"
    shutil.copytree(index["root"] / "collection", coll)
    idx = tmp_path / "index"
    build_index(coll, idx, index["weights"])
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1])] + sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "vitdense", "serve", str(idx), "--port", str(port), "--device",
                             "cpu", "--poll", "0"], stderr=subprocess.PIPE, text=True, env=env)
    base = f"http://127.0.0.1:{port}"

    def get(path):
        with urllib.request.urlopen(base + path, timeout=5) as res:
            return json.loads(res.read())

    try:
        deadline = time.time() + 60
        while True:
            try:
                assert get("/health") == {"status": "ok", "images": 5, "generation": 1}
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.time() < deadline
                time.sleep(0.2)
        Image.fromarray(photos[NAMES[2]][::-1]).resize((90, 70)).save(coll / "new.png")
        build_index(coll, idx, index["weights"])
        assert get("/health")["generation"] == 1  # --poll 0: only SIGHUP reloads
        proc.send_signal(signal.SIGHUP)
        deadline = time.time() + 20
        while get("/health")["generation"] != 2:
            assert time.time() < deadline
            time.sleep(0.1)
        assert get("/health")["images"] == 6 and get("/stats")["reloads"] == 1
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert f"http://127.0.0.1:{port}/ (this machine only)" in err and "Traceback" not in err

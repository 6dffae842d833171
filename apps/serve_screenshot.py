"""Make docs/serve.png: index real photos (scikit-image's and examples/) with the bundled backbone, serve them,
and drive the search page in headless chromium: upload a flower the index does not hold, ask why its best
match matched, click a point of the query for the similarity heat map, screenshot.

    python apps/serve_screenshot.py [--out docs/serve.png]
"""
from __future__ import annotations

import argparse
import io
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SKIMAGE = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
           "colorwheel", "camera", "coins", "horse", "brick", "gravel", "moon", "page"]
QUERY = ROOT / "examples" / "flowers" / "fresh_flower.jpg"


def collection(folder: Path) -> None:
    from skimage import data

    folder.mkdir(parents=True)
    for name in SKIMAGE:
        arr = getattr(data, name)()
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        Image.fromarray(arr).convert("RGB").save(folder / f"{name}.jpg", quality=92)
    left, right, _ = data.stereo_motorcycle()
    Image.fromarray(left).save(folder / "motorcycle_left.jpg", quality=92)
    for path in sorted((ROOT / "examples" / "flowers").glob("*.jpg")):
        if path != QUERY:
            shutil.copy(path, folder / path.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "serve.png"))
    args = parser.parse_args()

    import uvicorn
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as ChromeService
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import WebDriverWait

    from vitdense import create_serve_app, index_service
    from vitdense.cli import main as cli

    work = Path(tempfile.mkdtemp(prefix="vitdense-serve-shot-"))
    try:
        collection(work / "photos")
        cli.main(["index", str(work / "photos"), "--out", str(work / "index"), "--model", "vitdense_vits8",
                  "--device", "cpu", "--workers", "0"], standalone_mode=False)
        service = index_service(work / "index", device="cpu", poll_s=0)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_serve_app(service, watch=False), host="127.0.0.1", port=port,
                                               log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium")
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--no-first-run", f"--user-data-dir={work / 'profile'}",
                    "--window-size=1200,2600", "--force-device-scale-factor=1", "--hide-scrollbars"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=ChromeService(shutil.which("chromedriver")), options=options)
        wait = WebDriverWait(driver, 300, poll_frequency=0.1)
        try:
            driver.get(f"http://127.0.0.1:{port}/")
            driver.find_element("id", "file").send_keys(str(QUERY))
            wait.until(lambda d: d.execute_script("return !!document.body.dataset.results"))
            wait.until(lambda d: d.execute_script(
                "return Array.from(document.querySelectorAll('#grid img')).every(i => i.complete && i.naturalWidth)"))
            # explain the best match that is a flower too (the first result may be another orange picture)
            hits = driver.find_elements("css selector", "#grid .hit")
            flower = next(h for h in hits if h.find_element("css selector", ".name").get_attribute("textContent")
                          in ("garden.jpg", "yellow_flower.jpg", "dahlia.jpg"))
            flower.find_element("css selector", "button.why").click()
            wait.until(lambda d: d.execute_script(
                "var i = document.getElementById('why-img'); return i.complete && i.naturalWidth > 0 && "
                "document.body.dataset.why"))
            why = driver.find_element("id", "why-img")
            record = driver.execute_script("return window.vitdenseServe.state.why.record")
            best = max(record["pairs"], key=lambda p: p["similarity"])  # click the most similar pair's query point
            pair = best["a"]
            scale = why.size["height"] / record["size_a"][0]
            ActionChains(driver).move_to_element_with_offset(
                why, int(pair["x"] * scale - why.size["width"] / 2),
                int(pair["y"] * scale - why.size["height"] / 2)).click().perform()
            wait.until(lambda d: d.execute_script(
                "var i = document.getElementById('heat-img'); return !i.hidden && i.complete && i.naturalWidth > 0"))
            driver.execute_script("window.scrollTo(0, 0)")
            time.sleep(0.5)
            # a tall window holds the whole page; the picture is cut to the page's own height
            height = driver.execute_script("return document.body.getBoundingClientRect().bottom")
            shot = Image.open(io.BytesIO(driver.get_screenshot_as_png()))
            # 256 colours: a quarter of the bytes (the tree travels to a GPU machine under a size limit)
            shot = shot.crop((0, 0, shot.width, min(shot.height, int(height) + 16))).convert("RGB")
            shot.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
        finally:
            driver.quit()
            server.should_exit = True
        print(f"wrote {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""The docs' screenshots of the page (docs/serve.png at 1280 px, docs/serve-phone.png at 390 px), from a real model.

    python tests/screenshots.py runs/demo/best.pt docs     # after `make demo`

It serves the checkpoint, uploads synthetic lesions that `skinlesion synth` would draw (seeded, one per class
listed), a synthetic picture of plain skin and a text file named .jpg, and saves the top of the page at each width.
Not a test (the browser test checks the page); the same headless Chromium flags as tests/test_browser.py.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from helpers import CHROMIUM_FLAGS  # tests/helpers.py: Python puts this script's folder on sys.path
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from skinlesion.data.lesions import make_lesion, not_lesions, render


def uploads(folder: Path) -> list[Path]:
    paths = []
    for i, dx in enumerate(("mel", "nv", "bcc", "bkl")):
        rng = np.random.default_rng(20 + i)
        paths.append(folder / f"synthetic_{dx}.jpg")
        render(make_lesion(rng, dx), rng).save(paths[-1], format="JPEG", quality=92)
    paths.append(folder / "plain_skin.jpg")
    not_lesions(n=1)["skin without a lesion"][0].save(paths[-1], format="JPEG", quality=92)
    paths.append(folder / "notes.jpg")
    paths[-1].write_text("not an image at all\n")
    return paths


def main(checkpoint: Path, out: Path) -> None:
    work = Path(tempfile.mkdtemp())
    port = 8931
    server = subprocess.Popen(
        [sys.executable, "-m", "skinlesion", "serve", "--checkpoint", str(checkpoint), "--port", str(port)]
    )
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={work / 'profile'}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("serve did not start") from None
                time.sleep(0.5)
        files = uploads(work)
        for width, height, name in ((1280, 1500, "serve.png"), (390, 1700, "serve-phone.png")):
            browser.execute_cdp_cmd(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600},
            )
            browser.get(f"http://127.0.0.1:{port}/")
            WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "model-line").text)
            browser.find_element(By.ID, "files").send_keys("\n".join(map(str, files)))
            WebDriverWait(browser, 120).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".batch"))
            time.sleep(1)  # the heat maps' images decode after the batch appears
            browser.execute_script("window.scrollTo(0, 0)")
            browser.save_screenshot(str(out / name))
            print(f"wrote {out / name}")
    finally:
        browser.quit()
        server.terminate()
        server.wait(timeout=20)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

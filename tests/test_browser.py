"""The clinician's page in a real browser: headless Chromium (Debian's chromium + chromium-driver) via Selenium,
against a live `skinlesion serve`. It uploads a synthetic lesion and checks that the top-3 rows, the risk band
and the heat-map overlay are rendered, then saves a screenshot (SKINLESION_SCREENSHOT=path also copies it there).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from helpers import free_port

pytestmark = pytest.mark.slow
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def server(random_run: Path, shards_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    if not (CHROMIUM and DRIVER):
        pytest.skip("chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)")
    from skinlesion.card import calibrate
    from skinlesion.model import load_for_inference

    folder = tmp_path_factory.mktemp("browser")
    shutil.copy(random_run / "best.pt", folder / "best.pt")
    loaded = load_for_inference(folder / "best.pt")
    calibrate(loaded.model, folder / "best.pt", shards_dir, loaded.image_size, loaded.arch)
    port = free_port()
    log = (folder / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "skinlesion", "serve", "--checkpoint", str(folder / "best.pt"),
                             "--port", str(port)], stdout=log, stderr=log)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1)
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, (folder / "serve.log").read_text()
            time.sleep(0.2)
    yield url, folder
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture
def browser(tmp_path: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def test_upload_shows_top3_risk_band_and_heat_map(server, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from skinlesion.data.lesions import make_lesion, render

    url, _ = server
    rng = np.random.default_rng(7)
    image = tmp_path / "ISIC_lesion.jpg"
    render(make_lesion(rng, "mel"), rng).save(image, format="JPEG", quality=92)
    browser.get(url)
    wait = WebDriverWait(browser, 60)
    wait.until(ec.text_to_be_present_in_element((By.ID, "model-line"), "resnet18"))
    browser.find_element(By.ID, "files").send_keys(str(image))
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".result .risk")))
    notices = browser.find_elements(By.CSS_SELECTOR, ".result .ood")
    if notices:  # an unfamiliar-looking image: the numbers wait behind the notice until asked for
        assert not browser.find_element(By.CSS_SELECTOR, ".result .numbers").is_displayed()
        notices[0].find_element(By.TAG_NAME, "button").click()
    rows = browser.find_elements(By.CSS_SELECTOR, ".result .row")
    assert len(rows) == 3 and all("%" in r.text for r in rows)
    band = browser.find_element(By.CSS_SELECTOR, ".result .risk").get_attribute("data-risk")
    assert band in ("low", "elevated", "high")
    overlay = browser.find_element(By.CSS_SELECTOR, ".result .overlay")
    assert overlay.get_attribute("src").startswith("data:image/png;base64,")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", overlay)
    assert "Decision support, not a diagnosis" in browser.find_element(By.ID, "disclaimer").text
    shot = tmp_path / "serve.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("SKINLESION_SCREENSHOT"):
        shutil.copy(shot, os.environ["SKINLESION_SCREENSHOT"])

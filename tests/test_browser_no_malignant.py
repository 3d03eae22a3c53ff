"""The page for a model with no malignant class (a custom dataset that marks none), in headless Chromium: it says
so in `report.NO_MALIGNANT`'s words and shows no "Malignant probability ()" line, no band and no malignant
percent, for an image whose top class is confident. predict's JSON for the same file says the same.
(tests/test_browser.py checks the page of a model that has malignant classes.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CHROMIUM_FLAGS, free_port
from PIL import Image

from skinlesion.cli import main
from skinlesion.report import NO_MALIGNANT

pytestmark = pytest.mark.slow
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def served(random_run: Path, tmp_path_factory: pytest.TempPathFactory):
    """`skinlesion serve` of an existing checkpoint of custom classes whose facts name no malignant class."""
    if not (CHROMIUM and DRIVER):
        pytest.skip("chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)")
    folder = tmp_path_factory.mktemp("benign-only-page")
    obj = torch.load(random_run / "best.pt", map_location="cpu", weights_only=True)
    obj["classes"] = [f"c{i}" for i in range(len(obj["classes"]))]
    obj.pop("malignant", None)
    torch.save(obj, folder / "best.pt")
    port, log = free_port(), (folder / "serve.log").open("w")
    command = [sys.executable, "-m", "skinlesion", "serve", "--checkpoint", str(folder / "best.pt")]
    proc = subprocess.Popen([*command, "--port", str(port)], stdout=log, stderr=log)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1)
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, (folder / "serve.log").read_text()
            time.sleep(0.2)
    yield url, folder / "best.pt"
    proc.terminate()
    proc.wait(timeout=20)


def test_the_page_says_the_model_has_no_malignant_class(served, tmp_path: Path, capsys) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, checkpoint = served
    image = tmp_path / "lesion.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(image)
    assert main(["predict", "--json", "--checkpoint", str(checkpoint), str(image)]) == 0
    (expected,) = json.loads(capsys.readouterr().out)["results"]
    assert expected["malignant_probability"] is None and expected["risk_note"] == NO_MALIGNANT

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, "--window-size=1280,900", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        browser.get(url)
        WebDriverWait(browser, 60).until(ec.text_to_be_present_in_element((By.ID, "model-line"), "resnet18"))
        card = browser.find_element(By.ID, "card").get_attribute("textContent")  # in the closed "Model card" panel
        assert NO_MALIGNANT in card  # said with the model, before any image
        browser.find_element(By.ID, "files").send_keys(str(image))
        WebDriverWait(browser, 120).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".batch .result"))
        result = browser.find_element(By.CSS_SELECTOR, ".batch .result").text
        summary = browser.find_element(By.CSS_SELECTOR, ".batch table.summary").text
    finally:
        browser.quit()
    top = expected["predictions"][0]
    assert f"{top['dx']}: {top['name']}" in result and top["percent"] in result
    assert NO_MALIGNANT in result
    assert "Malignant probability" not in result and "()" not in result and "null" not in result
    assert "null" not in summary and "undefined" not in summary and "none" in summary

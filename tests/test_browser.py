"""The clinician's page in a real browser: headless Chromium (Debian's chromium + chromium-driver) via Selenium,
against a live `skinlesion serve`, checked the way a dermatologist in a busy clinic would use it.

One batch holds synthetic lesions, a plain-skin picture the out-of-distribution check flags, and a text file
named .jpg. The test checks what the page shows against `skinlesion predict` on the same files (whole percents,
bands, notice), that no band is ever shown beside the notice, that the heat-map switch hides the overlay, the
summary's order, the banner of a model trained on synthetic pictures (still in view when the results are
scrolled, and its absence for a card that says real data), no heat map for a flagged image and a legend under
every other, the malignant probability on a bar with the cut-offs marked, the full-resolution view, no request
for a missing favicon, the 20-file limit, kept and cleared results, the layout at 1280 and 390 px (no
horizontal scrolling, no word or file id broken mid-word, no header running into the next, band pills on one
line) and axe-core's WCAG 2.1 AA rules (tests/vendor/axe.min.js, injected by the test, never loaded by the page).
A binary (ISIC 2020-style) model is served too: its two classes and its band, as predict gives them.
Screenshots at 1280 and 390 px are saved (SKINLESION_SCREENSHOT=folder also copies them there).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from helpers import CHROMIUM_FLAGS, free_port

pytestmark = pytest.mark.slow
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
AXE = Path(__file__).parent / "vendor" / "axe.min.js"


def _serve(folder: Path) -> tuple[str, subprocess.Popen]:
    port = free_port()
    log = (folder / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "skinlesion", "serve", "--checkpoint", str(folder / "best.pt"), "--port", str(port)],
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1)
            return url, proc
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, (folder / "serve.log").read_text()
            time.sleep(0.2)


def _need_chromium() -> None:
    if not (CHROMIUM and DRIVER):
        pytest.skip("chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)")


@pytest.fixture(scope="module")
def served(random_run: Path, shards_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Two servers of the same model: its card as calibrated on the synthetic shards, and a copy whose card
    says it was trained on real HAM10000 images."""
    _need_chromium()
    from skinlesion.card import CARD, OOD, calibrate, limitations
    from skinlesion.model import load_for_inference

    synthetic = tmp_path_factory.mktemp("synthetic-card")
    shutil.copy(random_run / "best.pt", synthetic / "best.pt")
    loaded = load_for_inference(synthetic / "best.pt")
    calibrate(loaded.model, synthetic / "best.pt", shards_dir, loaded.image_size, loaded.arch)
    real = tmp_path_factory.mktemp("real-card")
    for name in ("best.pt", OOD):
        shutil.copy(synthetic / name, real / name)
    card = json.loads((synthetic / CARD).read_text())
    card["training_data"]["source"] = {
        "kind": "real",
        "synthetic": False,
        "dataset": "HAM10000",
        "images": 10015,
        "synthetic_images": 0,
        "lesions": 7470,
    }
    card["limitations"] = limitations(card["training_data"]["source"])
    (real / CARD).write_text(json.dumps(card))
    servers = [_serve(synthetic), _serve(real)]
    yield {"synthetic": (servers[0][0], synthetic), "real": (servers[1][0], real)}
    for _, proc in servers:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('profile')}", "--window-size=1280,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console: a 404 shows up there
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Four synthetic lesions, one synthetic skin picture with no lesion, and a text file named .jpg."""
    from skinlesion.data.lesions import make_lesion, not_lesions, render

    folder = tmp_path_factory.mktemp("uploads")
    paths = {}
    for i, dx in enumerate(("mel", "nv", "bcc", "bkl")):
        rng = np.random.default_rng(10 + i)
        paths[dx] = folder / f"ISIC_lesion_{dx}.jpg"
        render(make_lesion(rng, dx), rng).save(paths[dx], format="JPEG", quality=92)
    paths["skin"] = folder / "plain_skin.jpg"
    not_lesions(n=1)["skin without a lesion"][0].save(paths["skin"], format="JPEG", quality=92)
    paths["text"] = folder / "notes.jpg"
    paths["text"].write_text("not an image at all\n")
    return paths


def _open(browser, url: str, width: int = 1280) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": width < 600},
    )
    browser.get(url)
    WebDriverWait(browser, 60).until(ec.text_to_be_present_in_element((By.ID, "model-line"), "resnet18"))


def _upload(browser, paths: list[Path], batches: int) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.find_element(By.ID, "files").send_keys("\n".join(map(str, paths)))
    WebDriverWait(browser, 120).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".batch")) == batches)


def _click(browser, element) -> None:
    """Click as a user would: with the element scrolled to mid-screen, clear of the sticky banner."""
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    element.click()


def _axe_serious(browser) -> list[str]:
    """axe-core's WCAG 2.0/2.1 A and AA violations of impact serious or critical, one line each."""
    browser.execute_script(AXE.read_text(encoding="utf-8"))
    result = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "axe.run(document, {runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa']}})"
        ".then((r) => done(r.violations.map((v) => ({id: v.id, impact: v.impact, help: v.help,"
        " nodes: v.nodes.map((n) => n.target.join(' ')).slice(0, 3)}))), (e) => done([{id: 'axe failed',"
        " impact: 'critical', help: String(e), nodes: []}]));"
    )
    return [
        f"{v['id']} ({v['impact']}): {v['help']} at {v['nodes']}"
        for v in result
        if v["impact"] in ("serious", "critical")
    ]


# Where each line of an element's text breaks: the two characters either side of every break (text nodes only,
# so <wbr> break opportunities count and add nothing). A word or an id broken in the middle has a letter or a
# digit on both sides.
LINE_BREAKS = r"""
const breaks = [], walker = document.createTreeWalker(arguments[0], NodeFilter.SHOW_TEXT);
let last = null;
for (let node; (node = walker.nextNode());) {
  for (let i = 0; i < node.length; i++) {
    const range = document.createRange();
    range.setStart(node, i);
    range.setEnd(node, i + 1);
    const rect = [...range.getClientRects()].find((r) => r.width > 0);
    if (!rect) {  // a space collapsed at the end of a line: the break follows it
      if (last && /\s/.test(node.data[i])) last.ch = " ";
      continue;
    }
    if (last && rect.top > last.top + rect.height / 2) breaks.push(last.ch + node.data[i]);
    last = { ch: node.data[i], top: rect.top };
  }
}
return breaks;
"""
# The box of an element's text itself (not of the element), left/right/top/bottom.
TEXT_BOX = """
const range = document.createRange();
range.selectNodeContents(arguments[0]);
const r = range.getBoundingClientRect(), box = arguments[0].getBoundingClientRect();
return {left: r.left, right: r.right, top: r.top, bottom: r.bottom, boxLeft: box.left, boxRight: box.right};
"""


def _mid_word(browser, element) -> list[str]:
    """The line breaks of `element` that fall inside a word or an id (letter or digit on both sides)."""
    return [b for b in browser.execute_script(LINE_BREAKS, element) if b[0].isalnum() and b[1].isalnum()]


def _check_layout(browser, batch) -> None:
    """At the current width: card labels, file names, summary headers and band pills, as a clinician reads them."""
    from selenium.webdriver.common.by import By

    _click(browser, browser.find_element(By.CSS_SELECTOR, "#card-panel summary"))
    labels = browser.find_elements(By.CSS_SELECTOR, "#card table.card tr > :first-child")
    assert [label.text for label in labels][:3] == ["Intended use", "Trained on", "Validation"]
    for label in labels:
        assert _mid_word(browser, label) == [], f"card label {label.text!r} broken mid-word"
        assert browser.execute_script("return arguments[0].scrollWidth <= arguments[0].clientWidth", label)
    if browser.execute_script("return window.innerWidth") > 600:
        assert all(browser.execute_script(LINE_BREAKS, label) == [] for label in labels)  # one line each
    sensitivity = browser.find_element(By.ID, "card").text.split("melanoma sensitivity at specificity 0.9: ")[1]
    assert sensitivity[:5].replace(".", "", 1).isdigit() and sensitivity[1] == "."  # 0.833, not a bare 1
    _click(browser, browser.find_element(By.CSS_SELECTOR, "#card-panel summary"))
    names = batch.find_elements(By.CSS_SELECTOR, "table.summary tbody a, .result h3")
    for name in names:
        assert _mid_word(browser, name) == [], f"file name {name.text!r} broken mid-id"
    headers = [browser.execute_script(TEXT_BOX, th) for th in batch.find_elements(By.CSS_SELECTOR, "table.summary th")]
    for box in headers:  # each header's text inside its own cell, so no two run together
        assert box["boxLeft"] - 0.5 <= box["left"] and box["right"] <= box["boxRight"] + 0.5, headers
    for pill in batch.find_elements(By.CSS_SELECTOR, ".risk"):
        assert browser.execute_script(LINE_BREAKS, pill) == [], f"band pill {pill.text!r} wraps"
        cell = pill.find_element(By.XPATH, "..")
        pill_box, cell_box = browser.execute_script(TEXT_BOX, pill), browser.execute_script(TEXT_BOX, cell)
        assert pill_box["boxRight"] <= cell_box["boxRight"] + 0.5, f"band pill {pill.text!r} sticks out of its cell"


def _banner_stays_in_view(browser, max_share: float) -> None:
    """Scrolled to the last result, the banner is still within the viewport and takes at most `max_share` of it."""
    from selenium.webdriver.common.by import By

    browser.execute_script("document.querySelector('.result:last-of-type').scrollIntoView()")
    assert browser.execute_script("return window.scrollY") > 500
    box = browser.execute_script(
        "return arguments[0].getBoundingClientRect().toJSON()", browser.find_element(By.ID, "banner")
    )
    height = browser.execute_script("return window.innerHeight")
    assert box["top"] >= 0 and box["bottom"] <= height and box["height"] > 0, box
    assert box["height"] <= max_share * height, f"the banner takes {box['height']} of {height} px"
    browser.execute_script("window.scrollTo(0, 0)")


def _data_url_pixels(url: str) -> np.ndarray:
    import base64
    import io

    from PIL import Image

    header, data = url.split(",", 1)
    assert header == "data:image/png;base64"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGBA"))


def _shot(browser, tmp_path: Path, name: str) -> None:
    """A screenshot of the top of the page; for the docs (SKINLESION_SCREENSHOT) a taller one, then back to 900 px."""
    browser.execute_script("window.scrollTo(0, 0)")
    shot = tmp_path / name
    folder = os.environ.get("SKINLESION_SCREENSHOT")
    width = browser.execute_script("return window.innerWidth")
    if folder:
        metrics = {
            "width": width,
            "height": 1500 if width > 600 else 1700,
            "deviceScaleFactor": 1,
            "mobile": width < 600,
        }
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if folder:
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {**metrics, "height": 900})
        shutil.copy(shot, Path(folder) / name)


def test_the_page_says_what_predict_says_and_never_misleads(served, browser, images, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    from skinlesion.model import load_for_inference
    from skinlesion.predict import predict_images
    from skinlesion.report import SYNTHETIC_BANNER, Calibration

    url, folder = served["synthetic"]
    _open(browser, url)
    assert browser.find_element(By.ID, "download").get_attribute("disabled")
    assert not browser.find_element(By.ID, "files").is_displayed()  # the button is the one tab stop, not the input
    banner = browser.find_element(By.ID, "banner")
    assert banner.is_displayed() and SYNTHETIC_BANNER in banner.text

    # A batch of only unreadable files: no broken picture, and still nothing to download.
    _upload(browser, [images["text"]], batches=1)
    assert not browser.find_elements(By.CSS_SELECTOR, ".batch img")
    assert "could not be read" in browser.find_element(By.CSS_SELECTOR, ".batch .no-image").text
    assert browser.find_element(By.ID, "download").get_attribute("disabled")

    files = [images[k] for k in ("mel", "nv", "bcc", "bkl", "skin", "text")]
    _upload(browser, files, batches=2)
    assert len(browser.find_elements(By.CSS_SELECTOR, ".batch")) == 2  # the earlier batch is kept
    assert browser.find_element(By.ID, "download").get_attribute("disabled") is None
    batch = browser.find_elements(By.CSS_SELECTOR, ".batch")[0]  # newest first
    status = browser.find_element(By.ID, "status").text
    assert status.startswith("Batch 2: 5 of 6 images analysed") and "1 could not be read" in status
    assert not browser.find_elements(By.CSS_SELECTOR, "[role=alert]:not([hidden])")  # no alert per flagged image

    loaded = load_for_inference(folder / "best.pt")
    calibration = Calibration.load(folder / "best.pt", loaded)
    expected = {Path(e["image"]).name: e for e in predict_images(loaded, files, calibration=calibration)}
    assert expected["plain_skin.jpg"]["ood"]["flag"] and expected["plain_skin.jpg"]["risk"] is None
    assessed = [n for n, e in expected.items() if "error" not in e and not e["ood"]["flag"]]
    assert assessed, "no synthetic lesion passed the OOD check: the test needs one with a band"

    # The summary first: assessed images by malignant probability, then the flagged, then the unreadable.
    rows = batch.find_elements(By.CSS_SELECTOR, "table.summary tbody tr")
    names = [r.find_element(By.TAG_NAME, "a").text for r in rows]
    by_risk = sorted(assessed, key=lambda n: -expected[n]["malignant_probability"])
    flagged = [n for n, e in expected.items() if "error" not in e and e["ood"]["flag"]]
    assert names[: len(by_risk)] == by_risk and set(names[len(by_risk) : -1]) == set(flagged)
    assert names[-1] == "notes.jpg"
    for row in rows:
        if row.get_attribute("data-flagged") == "true":
            assert "Unfamiliar image" in row.text and not row.find_elements(By.CSS_SELECTOR, ".risk")

    # Every result: the numbers and words predict gives; never a band beside the notice, even when shown anyway.
    results = batch.find_elements(By.CSS_SELECTOR, ".result")
    assert len(results) == 6 and all(r.find_elements(By.TAG_NAME, "h3") for r in results)
    for result in results:
        entry = expected[result.find_element(By.TAG_NAME, "h3").text]
        if "error" in entry:
            assert not result.find_elements(By.TAG_NAME, "img") and entry["error"] in result.text
            continue
        notices = result.find_elements(By.CSS_SELECTOR, ".ood")
        assert bool(notices) == entry["ood"]["flag"]
        if notices:
            assert not result.find_element(By.CSS_SELECTOR, ".numbers").is_displayed()
            assert not result.find_elements(By.CSS_SELECTOR, ".risk")
            _click(browser, notices[0].find_element(By.TAG_NAME, "button"))
            assert not result.find_elements(By.CSS_SELECTOR, ".risk") and notices[0].is_displayed()
        percents = [e.text for e in result.find_elements(By.CSS_SELECTOR, ".pct")]
        assert percents == [p["percent"] for p in entry["predictions"]]
        assert all(p == "<1%" or p == ">99%" or p[:-1].isdigit() for p in percents)  # whole percents
        assert f"({' + '.join(entry['malignant_classes'])}): {entry['malignant_percent']}" in result.text
        assert entry["risk_note"] in result.text
        if entry["risk"]:
            band = result.find_element(By.CSS_SELECTOR, ".risk")
            assert band.get_attribute("data-risk") == entry["risk"] and band.text == entry["risk_label"]
        assert "LOW" not in result.text.upper().split()  # "low risk" is never said

    # The user's own picture with the model's crop outlined, the heat map inside it, and a switch that works;
    # no heat map at all for a flagged image (a map over plain skin drew a blob that read as a lesion).
    photos = batch.find_elements(By.CSS_SELECTOR, ".result img.photo")
    assert len(photos) == 5 and all(p.get_attribute("src").startswith("blob:") for p in photos)
    assert browser.execute_script("return arguments[0].naturalWidth", photos[0]) == 600  # full resolution
    overlays = batch.find_elements(By.CSS_SELECTOR, ".crop .overlay")
    assert len(overlays) == len(assessed) and all(o.is_displayed() for o in overlays)
    legend = _data_url_pixels(browser.find_element(By.CSS_SELECTOR, ".legend img").get_attribute("src"))[0]
    for result in results:
        entry = expected[result.find_element(By.TAG_NAME, "h3").text]
        if "error" in entry:
            continue
        has_map = bool(result.find_elements(By.CSS_SELECTOR, ".overlay"))
        assert has_map == (not entry["ood"]["flag"])
        assert bool(result.find_elements(By.CSS_SELECTOR, ".legend")) == has_map
        if has_map:
            what = result.find_element(By.CSS_SELECTOR, ".legend").text
            top = entry["predictions"][0]
            assert "regions that most drove the top suggestion" in what and f"({top['dx']}: {top['name']})" in what
            assert "not an outline of the lesion" in what
        else:
            assert "No heat map" in result.find_element(By.CSS_SELECTOR, ".no-heat").text
    rgba = _data_url_pixels(overlays[0].get_attribute("src"))  # low end see-through; green, never red or blue
    visible = rgba[rgba[..., 3] > 0]
    assert (
        (rgba[..., 3] == 0).any() and (visible[:, 1] >= visible[:, 0]).all() and (visible[:, 1] >= visible[:, 2]).all()
    )
    ramp = {tuple(c) for c in legend[legend[:, 3] > 0, :3]}  # the legend holds the map's own colours
    assert min(np.abs(legend[:, :3].astype(int) - visible[visible[:, 3].argmax(), :3]).sum(1)) <= 6 and len(ramp) > 20

    # The malignant probability on a bar, the cut-offs marked: 58% just under a cut-off and 34% far under it differ.
    thresholds = json.loads((folder / "model_card.json").read_text())["risk"]["thresholds"]
    for result in results:
        entry = expected[result.find_element(By.TAG_NAME, "h3").text]
        if not entry.get("risk"):
            continue
        meter = result.find_element(By.CSS_SELECTOR, ".numbers .meter")
        width = meter.size["width"]
        share = meter.find_element(By.CSS_SELECTOR, ".fill").size["width"] / width
        assert abs(share - entry["malignant_probability"]) < 0.01
        marks = {m.get_attribute("data-label"): m for m in meter.find_elements(By.CSS_SELECTOR, ".mark")}
        assert set(marks) == {"E", "H"}
        left = "return arguments[0].offsetLeft / arguments[0].parentNode.clientWidth"
        assert abs(browser.execute_script(left, marks["E"]) - thresholds["sensitivity_0.95"]) < 0.01
        assert abs(browser.execute_script(left, marks["H"]) - thresholds["sensitivity_0.80"]) < 0.01

    # Full resolution on request: the user's own file at its own size, in a dialog.
    _click(browser, results[0].find_element(By.XPATH, ".//button[text()='Full resolution']"))
    zoomed = browser.find_element(By.ID, "zoom-img")
    assert browser.find_element(By.ID, "zoom").get_attribute("open") is not None
    assert zoomed.get_attribute("src") == photos[0].get_attribute("src")
    assert browser.execute_script("return arguments[0].getBoundingClientRect().width", zoomed) == 600
    _click(browser, browser.find_element(By.CSS_SELECTOR, "#zoom button"))
    assert browser.find_element(By.ID, "zoom").get_attribute("open") is None

    # The banner stays in view while the results scroll, and every card repeats its first sentence.
    assert all(SYNTHETIC_BANNER.split(". ")[0] in r.find_element(By.CSS_SELECTOR, ".card-banner").text for r in results)
    _banner_stays_in_view(browser, max_share=0.15)
    _check_layout(browser, batch)
    console = [e["message"] for e in browser.get_log("browser")]
    assert not [m for m in console if "favicon" in m or "404" in m], console
    alts = [
        i.get_attribute("alt") for i in browser.find_elements(By.CSS_SELECTOR, "img:not(.legend img):not(#zoom-img)")
    ]
    assert len(set(alts)) == len(alts) and all(alts)
    _shot(browser, tmp_path, "serve.png")
    assert _axe_serious(browser) == []

    _click(browser, browser.find_element(By.ID, "cam-toggle"))
    hidden = "return getComputedStyle(arguments[0]).display"
    assert all(browser.execute_script(hidden, o) == "none" and not o.is_displayed() for o in overlays)
    _click(browser, browser.find_element(By.ID, "cam-toggle"))
    assert all(browser.execute_script(hidden, o) != "none" for o in overlays)

    # Clearing removes every batch and disables Download again.
    _click(browser, browser.find_element(By.ID, "clear"))
    assert not browser.find_elements(By.CSS_SELECTOR, ".batch")
    assert browser.find_element(By.ID, "download").get_attribute("disabled")


def test_phone_width_fits_and_passes_axe(served, browser, images, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    from skinlesion.report import SYNTHETIC_BANNER

    url, _ = served["synthetic"]
    _open(browser, url, width=390)
    _upload(browser, [images[k] for k in ("mel", "nv", "skin", "text")], batches=1)
    for button in browser.find_elements(By.CSS_SELECTOR, ".ood button"):
        _click(browser, button)
    assert browser.execute_script("return window.innerWidth") == 390
    width = browser.execute_script("return Math.max(document.documentElement.scrollWidth, document.body.scrollWidth)")
    assert width <= 390, f"the page is {width} px wide at 390 px: it scrolls sideways"
    right = "return arguments[0].getBoundingClientRect().right"
    for element in browser.find_elements(By.CSS_SELECTOR, ".pct, .risk, .result h3"):
        assert browser.execute_script(right, element) <= 390
    left = "return arguments[0].getBoundingClientRect().left"
    viewer, info = browser.find_element(By.CSS_SELECTOR, ".result").find_elements(By.XPATH, "./div")
    assert abs(browser.execute_script(left, viewer) - browser.execute_script(left, info)) < 1  # one column
    _banner_stays_in_view(browser, max_share=0.12)  # compact on a phone: it took 130 of 900 px
    assert browser.find_element(By.ID, "banner").text == f"Warning: {SYNTHETIC_BANNER}"
    _check_layout(browser, browser.find_element(By.CSS_SELECTOR, ".batch"))
    _shot(browser, tmp_path, "serve-phone.png")
    assert _axe_serious(browser) == []


def test_the_file_limit_is_stated_and_its_error_is_prominent(served, browser, images) -> None:
    from selenium.webdriver.common.by import By

    url, _ = served["synthetic"]
    _open(browser, url)
    assert "up to 20 images at a time" in browser.find_element(By.ID, "limits").text
    browser.find_element(By.ID, "files").send_keys("\n".join([str(images["mel"])] * 21))
    error = browser.find_element(By.ID, "upload-error")
    assert error.is_displayed() and error.get_attribute("role") == "alert"
    assert "21 files" in error.text and "at most 20" in error.text and "Nothing was uploaded" in error.text
    assert not browser.find_elements(By.CSS_SELECTOR, ".batch")


def test_no_banner_for_a_card_that_says_real_data(served, browser, images) -> None:
    from selenium.webdriver.common.by import By

    url, folder = served["real"]
    _open(browser, url)
    _upload(browser, [images["mel"]], batches=1)
    assert not browser.find_element(By.ID, "banner").is_displayed()
    _click(browser, browser.find_element(By.CSS_SELECTOR, "#card-panel summary"))
    card = browser.find_element(By.ID, "card").text
    # Trained on: the train split's distinct images and lesions, not the dataset's 10015 over every split.
    train = json.loads((folder / "model_card.json").read_text())["training_data"]["splits"]["train"]
    trained = f"HAM10000, real: {train['images']} images of {train['groups']} lesions (the train split)"
    assert trained in card and "10015" not in card and "synthetic" not in card.lower()
    assert not browser.find_elements(By.CSS_SELECTOR, ".card-banner")


@pytest.fixture(scope="module")
def binary_served(binary_run: Path, isic2020_data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    """A two-class (other, mel) model on synth's ISIC 2020 layout, its card calibrated on that data's shards (the
    random weights of `binary_run`: the page's question is how it shows a binary model, not how good one is)."""
    from skinlesion.card import calibrate
    from skinlesion.data.synthetic_isic import IMAGES_2020
    from skinlesion.model import load_for_inference

    _need_chromium()
    raw, shards = isic2020_data
    root = tmp_path_factory.mktemp("binary-served")
    folder = root / "served"
    folder.mkdir()
    shutil.copy(binary_run / "best.pt", folder / "best.pt")
    loaded = load_for_inference(folder / "best.pt")
    calibrate(loaded.model, folder / "best.pt", shards, loaded.image_size, loaded.arch)
    url, proc = _serve(folder)
    yield url, folder, sorted((raw / IMAGES_2020).glob("*.jpg"))[:12]
    proc.terminate()
    proc.wait(timeout=20)


def test_a_binary_model_gets_its_two_classes_and_an_honest_band(binary_served, browser) -> None:
    """ISIC 2020's head has 2 classes: the page asked for the top 3 and every upload answered 500."""
    from selenium.webdriver.common.by import By

    from skinlesion.model import load_for_inference
    from skinlesion.predict import predict_images
    from skinlesion.report import Calibration, percent

    url, folder, candidates = binary_served
    loaded = load_for_inference(folder / "best.pt")
    calibration = Calibration.load(folder / "best.pt", loaded)
    assert calibration.problem is None
    expected = {Path(e["image"]).name: e for e in predict_images(loaded, candidates, calibration=calibration)}
    familiar = [p for p in candidates if not expected[p.name]["ood"]["flag"]]
    assert familiar, "every ISIC 2020 image was flagged: the test needs one the page judges"
    entry = expected[familiar[0].name]
    _open(browser, url)
    _upload(browser, familiar[:1], batches=1)
    result = browser.find_element(By.CSS_SELECTOR, ".result")
    assert [e.text for e in result.find_elements(By.CSS_SELECTOR, ".pct")] == [
        p["percent"] for p in entry["predictions"]
    ]
    assert len(entry["predictions"]) == 2 and f"(mel): {entry['malignant_percent']}" in result.text
    assert entry["risk_note"] in result.text
    thresholds = calibration.thresholds
    _click(browser, browser.find_element(By.CSS_SELECTOR, "#card-panel summary"))
    card = browser.find_element(By.ID, "card").text
    validation = json.loads((folder / "model_card.json").read_text())["validation"]
    low, high = validation["auc_ci95"]  # the binary task's own metric, as the leaderboard ranks it
    assert f"ROC AUC of the malignant class {validation['auc']:.3f} (95% CI {low:.3f}–{high:.3f})" in card
    if entry["risk"]:  # the band and its note quote the card's own cut-offs
        assert result.find_element(By.CSS_SELECTOR, ".risk").text == entry["risk_label"]
        for key in ("sensitivity_0.80", "sensitivity_0.95"):
            assert percent(thresholds[key]) in entry["risk_note"] and percent(thresholds[key]) in card
    else:  # unusable cut-offs: no pill, only predict's note (already checked above) saying why there is no band
        assert not result.find_elements(By.CSS_SELECTOR, ".risk") and "No risk band" in entry["risk_note"]


def test_a_custom_binary_models_card_gives_its_own_positive_class_figure(binary_served, browser, tmp_path) -> None:
    """A custom dataset's malignant class need not be `mel` ("malignant", say): the card's melanoma figure is then
    null, and the page showed "melanoma sensitivity …: n/a" where the model's own class had a figure. Here the
    served card is edited to name the other class positive, as such a model's card would."""
    from selenium.webdriver.common.by import By

    _, folder, _ = binary_served
    for name in ("best.pt", "model_card.json", "ood.pt"):
        shutil.copy(folder / name, tmp_path / name)
    card = json.loads((tmp_path / "model_card.json").read_text())
    card["validation"] |= {"positive": "other", "positive_sensitivity_at_specificity_0.9": 0.123}
    card["validation"]["melanoma_sensitivity_at_specificity_0.9"] = None
    (tmp_path / "model_card.json").write_text(json.dumps(card))
    url, proc = _serve(tmp_path)
    try:
        _open(browser, url)
        _click(browser, browser.find_element(By.CSS_SELECTOR, "#card-panel summary"))
        text = browser.find_element(By.ID, "card").text
        assert "other sensitivity at specificity 0.9: 0.123" in text and "melanoma sensitivity" not in text
    finally:
        proc.terminate()
        proc.wait(timeout=20)

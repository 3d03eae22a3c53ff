"""`skinlesion serve`'s API through FastAPI's test client: answers, every bad upload, the limits, the card (who is
answered at all: test_serve_access.py).

Also: evaluate, predict and serve give the same probabilities for the same image file (one inference path).
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import struct
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from fastapi.testclient import TestClient
from helpers import plain_jpeg, png_header_only, post_files, serve_client
from PIL import Image

from skinlesion.evaluate import collect_predictions
from skinlesion.labels import CLASSES
from skinlesion.model import load_for_inference
from skinlesion.predict import predict_images
from skinlesion.serve import Settings, create_app


@pytest.fixture(scope="module")
def client(calibrated: Path):
    with serve_client(calibrated) as c:
        yield c


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _png16() -> bytes:
    """A 16-bit greyscale PNG written by hand (PIL saves I;16 as 16-bit too, but this pins the format)."""
    width, height = 8, 8
    raw = b"".join(b"\0" + struct.pack(">8H", *[i * 4000 for i in range(8)]) for _ in range(height))

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_one_image_gets_predict_fields_risk_and_ood(client: TestClient) -> None:
    response = post_files(client, [("lesion.jpg", plain_jpeg())])
    assert response.status_code == 200
    (entry,) = response.json()
    assert entry["image"] == "lesion.jpg" and len(entry["predictions"]) == 3
    assert {p["dx"] for p in entry["predictions"]} <= set(CLASSES) and 0 <= entry["malignant_probability"] <= 1
    assert entry["risk"] in ("below_cutoffs", "elevated", "high", None) and entry["risk_note"]
    assert set(entry["ood"]) == {"flag", "score", "threshold"} and isinstance(entry["ood"]["flag"], bool)
    assert "cam_overlay" not in entry


def _lesion_jpeg(dx: str, seed: int) -> bytes:
    from skinlesion.data.lesions import make_lesion, render

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    render(make_lesion(rng, dx), rng).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def test_many_files_answer_in_order_and_cam_is_a_png(client: TestClient) -> None:
    files = [(f"img{i}.jpg", plain_jpeg((20 * i, 90, 70))) for i in range(4)]
    files += [(f"{dx}.jpg", _lesion_jpeg(dx, 10 + i)) for i, dx in enumerate(("mel", "nv", "bcc", "bkl"))]
    response = post_files(client, files, "?cam=1&tta=1")
    assert response.status_code == 200
    entries = response.json()
    assert [e["image"] for e in entries] == [n for n, _ in files]
    assert all(("cam_overlay" in e) == ("cam" in e) == (not e["ood"]["flag"]) for e in entries)
    mapped = [e for e in entries if "cam_overlay" in e]
    assert mapped, "every synthetic lesion was flagged: the test needs one with a heat map"
    png = mapped[0]["cam_overlay"].split(",", 1)
    assert png[0] == "data:image/png;base64" and Image.open(io.BytesIO(__import__("base64").b64decode(png[1])))


def test_a_binary_model_answers_its_two_classes_with_cam_and_tta(binary_run: Path) -> None:
    with serve_client(binary_run / "best.pt") as client:
        for query in ("", "?cam=1&tta=1"):
            response = post_files(client, [("lesion.jpg", plain_jpeg())], query)
            assert response.status_code == 200, response.text
            (entry,) = response.json()
            assert sorted(p["dx"] for p in entry["predictions"]) == ["mel", "other"]
            assert entry["malignant_classes"] == ["mel"]


def test_no_heat_map_for_an_image_flagged_as_unfamiliar(client: TestClient) -> None:
    from skinlesion.data.lesions import not_lesions

    buf = io.BytesIO()
    not_lesions(n=1)["skin without a lesion"][0].save(buf, format="JPEG", quality=92)
    for query in ("?cam=1", "?cam=1&tta=1"):
        (entry,) = post_files(client, [("skin.jpg", buf.getvalue())], query).json()
        assert entry["ood"]["flag"], "plain skin should be flagged: the test needs a flagged image"
        assert "cam" not in entry and "cam_overlay" not in entry


def test_heat_map_colours_are_not_red_and_the_legend_is_drawn_by_the_same_function(client: TestClient) -> None:
    """Green is the strongest channel everywhere (never red over a red lesion, never blue), the low end is
    see-through, and the legend /api/model sends holds the map's own colours."""
    import base64

    from skinlesion.heatmap import CAM_FLOOR, heat_colours

    colours, alpha = heat_colours(np.linspace(0, 1, 101))
    assert (colours[:, 1] >= colours[:, 0]).all() and (colours[:, 1] >= colours[:, 2]).all()
    assert (alpha[np.linspace(0, 1, 101) < CAM_FLOOR] == 0).all() and alpha[-1] > 200
    legend = client.get("/api/model").json()["heat_map"]
    header, data = legend["legend"].split(",", 1)
    assert header == "data:image/png;base64" and legend["floor"] == CAM_FLOOR and "not an outline" in legend["meaning"]
    ramp = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGBA"))[0]
    assert ramp[0, 3] == 0 and ramp[-1, 3] == alpha[-1] and (ramp[-1, :3] == colours[-1]).all()


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("empty.jpg", b"", "empty file"),
        ("notes.jpg", b"this is a text file, not a photo\n" * 10, "corrupt image"),
        ("truncated.jpg", plain_jpeg(size=(400, 300), quality=95)[:700], "truncated image"),
        ("bomb.png", png_header_only(30_000, 30_000), "decompression bomb"),
    ],
)
def test_bad_uploads_get_a_reason_and_the_others_are_answered(client: TestClient, name, data, reason) -> None:
    response = post_files(client, [("good.jpg", plain_jpeg()), (name, data)])
    assert response.status_code == 200
    good, bad = response.json()
    assert "predictions" in good
    assert bad["image"] == name and bad["error"].startswith(reason) and "predictions" not in bad


@pytest.mark.parametrize(
    "data",
    [
        plain_jpeg(mode="CMYK", colour=(10, 80, 120, 20)),
        _png16(),
        _png(Image.new("RGBA", (40, 30), (200, 100, 80, 128))),
    ],
    ids=["cmyk-jpeg", "16-bit-png", "rgba-png"],
)
def test_unusual_but_valid_images_are_converted_and_answered(client: TestClient, data: bytes) -> None:
    (entry,) = post_files(client, [("x", data)]).json()
    assert "predictions" in entry, entry


def test_only_bad_files_is_422_with_reasons_and_no_file_is_400(client: TestClient) -> None:
    response = post_files(client, [("a.jpg", b"")])
    assert response.status_code == 422 and response.json()[0]["error"] == "empty file"
    assert client.post("/api/predict").status_code == 400
    assert client.post("/api/predict", data={"other": "x"}).status_code == 400


def test_size_and_count_limits(calibrated: Path) -> None:
    with serve_client(calibrated, max_mb=0.01, max_files=20) as c:
        big = plain_jpeg(size=(600, 450), quality=100) + b"\0" * 20_000
        (entry,) = post_files(c, [("big.jpg", big)]).json()
        assert entry["error"].startswith("too large")
        assert post_files(c, [(f"{i}.jpg", plain_jpeg()) for i in range(21)]).status_code == 413
        assert post_files(c, [(f"{i}.jpg", plain_jpeg()) for i in range(20)]).status_code == 200


def test_model_card_with_and_without_calibration(client: TestClient, random_run: Path, tmp_path: Path) -> None:
    card = client.get("/api/model").json()
    assert card["available"] and card["arch"] == "resnet18" and card["image_size"] == 32
    assert set(card["risk"]["thresholds"]) == {"sensitivity_0.95", "sensitivity_0.80"}
    assert card["ood"]["threshold"] > 0 and "synthetic pictures" in card["limitations"][0]
    shutil.copy(random_run / "model.pt", tmp_path / "model.pt")
    with serve_client(tmp_path / "model.pt") as bare:
        card = bare.get("/api/model").json()
        assert not card["available"] and "model_card.json" in card["reason"]
        (entry,) = post_files(bare, [("a.jpg", plain_jpeg())]).json()
        assert entry["risk"] is None and entry["ood"] is None and entry["predictions"]


def test_a_checkpoint_that_would_run_code_is_refused_at_start(tmp_path: Path) -> None:
    from skinlesion.errors import UserError

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": Exploit()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="refusing to load"):
        create_app(Settings(tmp_path / "evil.pt"))


def test_uploads_and_their_names_never_reach_the_log_or_the_disk(client, caplog, monkeypatch) -> None:
    import tempfile

    spilled = []
    real = tempfile.TemporaryFile

    def recording(*args, **kwargs):  # what SpooledTemporaryFile calls when an upload outgrows memory
        spilled.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", recording)
    big = np.random.default_rng(0).integers(0, 256, (900, 1200, 3), dtype=np.uint8)
    data = _png(Image.fromarray(big))  # > 1 MB: starlette's default spool limit
    with caplog.at_level("INFO", logger="skinlesion.serve"):
        assert post_files(client, [("patient-jane-doe.png", data)]).status_code == 200
    assert "patient-jane-doe" not in caplog.text and f"{len(data)} bytes, format PNG" in caplog.text
    assert not spilled


def test_evaluate_predict_and_serve_agree_on_the_same_file(client, calibrated, tmp_path) -> None:
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(60, 200, (45, 60, 3), dtype=np.uint8)).resize((120, 90))
    path = tmp_path / "ISIC_0000001.jpg"
    image.save(path, format="JPEG", quality=92)
    loaded = load_for_inference(calibrated)
    (predicted,) = predict_images(loaded, [path], top_k=7)
    (served,) = client.post("/api/predict", files=[("files", (path.name, path.read_bytes()))]).json()
    (with_cam,) = client.post("/api/predict?cam=1", files=[("files", (path.name, path.read_bytes()))]).json()
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "test-000000.tar", "w") as tar:
        for member, data in (
            ("ISIC_0000001.jpg", path.read_bytes()),
            ("ISIC_0000001.cls", b"4"),
            ("ISIC_0000001.json", json.dumps({"image_id": "ISIC_0000001"}).encode()),
        ):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    manifest = {
        "classes": list(CLASSES),
        "splits": {"test": {"samples": 1, "files": ["test-000000.tar"], "shard_samples": [1]}},
    }
    (shards / "manifest.json").write_text(json.dumps(manifest))
    evaluated = collect_predictions(loaded.model, Accelerator(cpu=True), shards, "test", loaded.image_size)
    by_dx = {p["dx"]: p["probability"] for p in predicted["predictions"]}
    for p, q in zip(served["predictions"], with_cam["predictions"], strict=True):
        assert abs(p["probability"] - by_dx[p["dx"]]) < 1e-6 and abs(q["probability"] - by_dx[q["dx"]]) < 1e-6
        assert abs(evaluated.probs[0][CLASSES.index(p["dx"])] - by_dx[p["dx"]]) < 1e-6


def test_evaluate_on_val_writes_the_card_and_says_when_it_cannot(random_run, shards_dir, tmp_path, capsys) -> None:
    from skinlesion.cli import main

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(random_run / "best.pt", run / "best.pt")
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--shards", str(shards_dir), "--split", "val"]) == 0
    card = json.loads((run / "model_card.json").read_text())
    assert card["checkpoint"] == "best.pt" and card["validation"]["n_samples"] == 59 and (run / "ood.pt").is_file()
    capsys.readouterr()
    (run / "model_card.json").write_text("{ damaged")
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--shards", str(shards_dir), "--split", "val"]) == 0
    assert json.loads((run / "model_card.json").read_text())["arch"] == "resnet18"  # rewritten


BOUNDARY = "skinlesion-test-boundary"


def _multipart(files: int, size: int, chunk: int = 64 * 1024) -> Iterator[bytes]:
    """A multipart body of `files` parts of `size` bytes each, produced a piece at a time (as it streams)."""
    for i in range(files):
        disposition = f'Content-Disposition: form-data; name="files"; filename="{i}.jpg"'
        yield f"--{BOUNDARY}\r\n{disposition}\r\nContent-Type: image/jpeg\r\n\r\n".encode()
        for start in range(0, size, chunk):
            yield b"\xff" * min(chunk, size - start)
        yield b"\r\n"
    yield f"--{BOUNDARY}--\r\n".encode()


def _stream(app, body: Iterator[bytes]) -> tuple[int, int, int]:
    """POST `body` to /api/predict as a chunked request, straight through ASGI, one piece per receive().

    Returns (status, bytes the server pulled, bytes it would have pulled had it read everything)."""
    pieces = list(body)
    pulled = 0

    async def receive() -> dict:
        nonlocal pulled
        if not pieces:
            return {"type": "http.request", "body": b"", "more_body": False}
        piece = pieces.pop(0)
        pulled += len(piece)
        return {"type": "http.request", "body": piece, "more_body": True}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    total = sum(map(len, pieces))
    content_type = f"multipart/form-data; boundary={BOUNDARY}".encode()
    headers = [(b"host", b"127.0.0.1:8000"), (b"transfer-encoding", b"chunked"), (b"content-type", content_type)]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/predict",
        "raw_path": b"/api/predict",
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, pulled, total


def test_limits_hold_while_a_chunked_body_streams_in(calibrated: Path) -> None:
    """Issue 16, point 6: a chunked request (no Content-Length) of 30 x 20 MB parts was read whole before its
    413. Now the parser stops at file --max-files + 1, and the byte count stops the body at its limit."""
    app = create_app(Settings(calibrated, max_mb=0.05, max_files=2))  # limit: 2 x (50 kB + 1 MB)
    status, pulled, total = _stream(app, _multipart(files=30, size=100_000))
    assert status == 413 and pulled < 4 * 100_000 and total > 30 * 100_000
    status, pulled, total = _stream(app, _multipart(files=1, size=5_000_000))
    assert status == 413 and 2_100_000 < pulled <= 2_100_000 + 64 * 1024 < total


def test_an_upload_over_the_spool_size_never_reaches_the_disk_even_chunked(calibrated: Path, monkeypatch) -> None:
    """Issue 16, point 7: a file over --max-mb + 1 MB rolled over into a (deleted) temporary file in /tmp."""
    import tempfile

    spilled = []
    real = tempfile.TemporaryFile

    def recording(*args, **kwargs):
        spilled.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", recording)
    with tempfile.SpooledTemporaryFile(max_size=10) as probe:  # the patch does catch a roll-over
        probe.write(b"x" * 11)
    assert len(spilled) == 1
    spilled.clear()
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    with serve_client(calibrated, max_mb=0.5, max_files=2) as c:
        for body in (b"".join(_multipart(1, 2_500_000)), _multipart(1, 2_500_000)):  # Content-Length, then chunked
            response = c.post("/api/predict", content=body, headers=headers)
            assert response.status_code == 422  # over --max-mb + 1 MB, within the request's 2 x (0.5 + 1) MB
            assert [e["error"] for e in response.json()] == ["too large (2.5 MB; the limit is 0.5 MB)"]
    assert not spilled

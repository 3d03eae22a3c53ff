"""`skinlesion serve` latency and load, each against a baseline measured in the same run.

1. Latency: one 600x450 JPEG per request, sequentially, model warm (5 requests of warm-up), median and p95
   of --requests requests, without and with the Grad-CAM heat map (cam=1), and with TTA.
2. Load: --clients concurrent clients x --per-client requests of one image each, against a server that
   batches (up to 8 images per forward pass, the default) and against one that answers one image at a
   time (--batch 1): errors, p50 and p95 latency, images/s.

The server runs as the real command in a subprocess, bound to 127.0.0.1, with OMP_NUM_THREADS threads.

    skinlesion bench serve --checkpoint runs/demo/best.pt --threads 2
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lesion_jpeg() -> bytes:
    from skinlesion.data.lesions import make_lesion, render

    rng = np.random.default_rng(11)
    buf = io.BytesIO()
    render(make_lesion(rng, "mel"), rng).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def post(url: str, data: bytes, query: str = "") -> float:
    """One multipart request with one file; seconds, or raises on any error status."""
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="x.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        f"{url}/api/predict{query}",
        data=body,
        method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        json.loads(response.read())
    return time.perf_counter() - start


class Server:
    def __init__(self, checkpoint: Path, threads: int, batch: int) -> None:
        self.port = free_port()
        env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "skinlesion",
                "serve",
                "--checkpoint",
                str(checkpoint),
                "--port",
                str(self.port),
                "--batch",
                str(batch),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(self.url + "/healthz", timeout=1)
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.2)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000


def latency(url: str, data: bytes, query: str, n: int) -> dict:
    for _ in range(5):
        post(url, data, query)
    times = [post(url, data, query) for _ in range(n)]
    return {"median_ms": statistics.median(times) * 1000, "p95_ms": pct(times, 95), "requests": n}


def load(url: str, data: bytes, clients: int, per_client: int) -> dict:
    for _ in range(3):
        post(url, data)
    times: list[float] = []
    errors = []
    lock = threading.Lock()

    def client() -> None:
        for _ in range(per_client):
            try:
                t = post(url, data)
                with lock:
                    times.append(t)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                with lock:
                    errors.append(str(exc))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {
        "errors": len(errors),
        "p50_ms": pct(times, 50),
        "p95_ms": pct(times, 95),
        "images_per_second": len(times) / wall,
        "requests": clients * per_client,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="skinlesion bench serve", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--per-client", type=int, default=5)
    args = parser.parse_args(argv)
    data = lesion_jpeg()
    results: dict = {"image_bytes": len(data), "threads": args.threads}
    server = Server(args.checkpoint, args.threads, batch=8)
    try:
        for name, query in (("plain", ""), ("cam", "?cam=1"), ("tta", "?tta=1")):
            results[f"latency_{name}"] = latency(server.url, data, query, args.requests)
        results["load_batched"] = load(server.url, data, args.clients, args.per_client)
    finally:
        server.close()
    server = Server(args.checkpoint, args.threads, batch=1)
    try:
        results["load_one_at_a_time"] = load(server.url, data, args.clients, args.per_client)
    finally:
        server.close()
    results["batching_speedup"] = (
        results["load_batched"]["images_per_second"] / results["load_one_at_a_time"]["images_per_second"]
    )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

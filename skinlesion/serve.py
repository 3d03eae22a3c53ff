"""`skinlesion serve`: the dermatologist's web page and its JSON API, on FastAPI + uvicorn.

The model is loaded once. Requests that arrive together share forward passes: a small queue collects
up to 8 images, or whatever came within 10 ms, and runs them as one batch in a worker thread, so the
event loop keeps accepting uploads meanwhile. Uploads stay in memory and the log records sizes, formats
and timings, never an image or its file name.

Limits hold while the body streams in, whatever its framing (Content-Length or chunked): the request's bytes
are counted as they arrive and the request stops with 413 past --max-files x (--max-mb + 1 MB); the parser
stops at file --max-files + 1; and of each file at most --max-mb + 1 byte is kept, below the spool size, so an
upload is never written to a temporary file (the rest is counted and dropped, and the file gets "too large":
`skinlesion.uploads`).
Without --token, only requests addressed to localhost, the --host bound to and --allow-host names (exact:
`skinlesion.hosts`) are answered (DNS rebinding); `/` and `/healthz` (which names nothing) are public,
everything under /api/ needs the token when there is one, and there is no Swagger page, which would load from
a CDN.

Every image goes through `skinlesion.inference`, the path `evaluate` and `predict` use, and gets the
fields of `predict --json` plus the risk band and the out-of-distribution verdict from the model card
(`skinlesion.card`), and on request a Grad-CAM heat map, never for an image flagged as unfamiliar. Without a
model card the page says that thresholds and metrics are unavailable.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import socket
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from skinlesion import heatmap, inference
from skinlesion.errors import UserError
from skinlesion.hosts import HostCheck, allowed_name, canonical
from skinlesion.model import LoadedModel, load_for_inference
from skinlesion.predict import DISCLAIMER, default_top_k, preprocessing
from skinlesion.report import Calibration
from skinlesion.uploads import PART_SLACK, TooLarge, UploadParser, decode_upload

log = logging.getLogger("skinlesion.serve")
BATCH, WAIT_S = 8, 0.010  # images per shared forward pass; how long the first waits for company
LOCAL_NAMES = ("localhost", "127.0.0.1", "[::1]")
WILDCARDS = ("0.0.0.0", "::", "")


@dataclass
class Settings:
    checkpoint: Path
    token: str | None = None
    max_mb: float = 20.0
    max_files: int = 20
    device: str = "auto"
    batch: int = BATCH  # images per shared forward pass (1: one request at a time, the benchmark's baseline)
    host: str = "127.0.0.1"  # the address bound to: a name requests may be addressed to
    allow_hosts: tuple[str, ...] = ()  # further exact names (without --token; --allow-host): skinlesion.hosts

    def check(self) -> None:
        """Each setting usable, or one line saying which is not (a NaN --max-mb once made a traceback)."""
        if not (math.isfinite(self.max_mb) and self.max_mb > 0) or self.max_files < 1 or self.batch < 1:
            raise UserError("--max-mb must be a number > 0, and --max-files and --batch whole numbers >= 1")
        if self.token is not None and not (self.token.isascii() and self.token.isprintable() and " " not in self.token):
            raise UserError(
                "--token (or SKINLESION_TOKEN) must be printable ASCII without spaces: a browser sends it in an "
                "HTTP header, which cannot carry other characters; e.g. use "
                "`python -c 'import secrets; print(secrets.token_urlsafe())'`"
            )
        for name in self.allow_hosts:  # exact names only: `*` once switched the Host check off
            allowed_name(name)

    def host_names(self) -> list[str]:
        """The Host header values answered without a token: this machine's loopback names, the address bound
        to (for 0.0.0.0 or ::, this machine's name), and --allow-host."""
        bound = [socket.gethostname(), socket.getfqdn()] if self.host in WILDCARDS else [self.host]
        names = [canonical(n) for n in (*LOCAL_NAMES, *bound)] + [allowed_name(n) for n in self.allow_hosts]
        return sorted({n for n in names if n})


@dataclass
class _Item:
    image: torch.Tensor  # uint8 [3, S, S]
    tta: bool
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Model:
    """The loaded checkpoint, its card and OOD statistics, and the batching queue in front of it."""

    def __init__(self, settings: Settings) -> None:
        device = settings.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is visible; use --device cpu")
        self.device = torch.device(device)
        self.loaded: LoadedModel = load_for_inference(settings.checkpoint)
        _check_finite(self.loaded)
        # The card and ood.pt, if they were computed on these weights (matched by digest; every value checked).
        self.calibration = Calibration.load(settings.checkpoint, self.loaded)
        self.card, self.ood, self.card_problem = self.calibration.card, self.calibration.ood, self.calibration.problem
        self.weights = self.calibration.weights
        if self.card_problem:
            print(f"note: no risk bands or out-of-distribution check: {self.card_problem}", flush=True)
        if note := inference.fallback_note(self.loaded.shard_size, self.loaded.jpeg_quality):
            print(f"note: {note}", flush=True)
        self.loaded.model.to(self.device)
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        self.batch = settings.batch

    async def batcher(self) -> None:
        """Forever: take what is queued (up to BATCH, waiting WAIT_S for company) and answer it in one pass."""
        while True:
            items = [await self.queue.get()]
            deadline = time.perf_counter() + WAIT_S
            while len(items) < self.batch and (left := deadline - time.perf_counter()) > 0:
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), left))
                except TimeoutError:
                    break
            for tta in (False, True):
                group = [item for item in items if item.tta == tta]
                if group:
                    try:
                        outputs = await asyncio.to_thread(self._forward, [i.image for i in group], tta)
                        for item, output in zip(group, outputs, strict=True):
                            item.done.set_result(output)
                    except Exception as exc:  # a failed pass must not leave its requests waiting forever
                        for item in group:
                            item.done.set_exception(exc)

    def _forward(self, images: list[torch.Tensor], tta: bool) -> list[tuple[torch.Tensor, float | None]]:
        out = inference.run(self.loaded.model, torch.stack(images).to(self.device), tta=tta)
        return list(zip(out.probs.cpu(), self.calibration.scores(out), strict=True))

    def describe(self, probs: torch.Tensor, score: float | None) -> dict[str, Any]:
        """What predict says about the image: the same bands, notice and words (`report.Calibration.judge`),
        with the top 3 of the model's classes, or all of them when it has fewer (2 for ISIC 2020)."""
        return self.calibration.judge(probs, score, default_top_k(self.loaded.classes))

    def with_heat_map(self, image: torch.Tensor) -> tuple[torch.Tensor, float | None, np.ndarray]:
        """Probabilities, OOD score and the Grad-CAM map [S, S] in [0, 1] for the top class, from one pass (no
        TTA). The map becomes pictures (`heatmap.heat_map_pictures`) only once the image is known not to be flagged."""
        maps, out = inference.grad_cam(self.loaded.model, image[None].to(self.device))
        score = float(self.ood.scores(out)[0]) if self.ood else None
        return out.probs[0].cpu(), score, maps[0].cpu().numpy()

    def model_card(self) -> dict[str, Any]:
        base = {
            "checkpoint": self.loaded.source.name,
            "arch": self.loaded.arch,
            "image_size": self.loaded.image_size,
            "disclaimer": DISCLAIMER,
            "banner": self.calibration.banner,
            "malignant_classes": list(self.calibration.labels.malignant),
            "malignant_note": self.calibration.malignant_note,
            "preprocessing": preprocessing(self.loaded),
            "heat_map": heatmap.legend(),
        }
        if self.card is None:
            return base | {"available": False, "reason": self.card_problem, "weights_sha256": self.weights}
        return {**self.card, **base, "available": True}  # "checkpoint": the file served, which may be model.pt


def _check_finite(loaded: LoadedModel) -> None:
    """Weights with NaN or infinity answer every image with NaN, which JSON cannot carry: refuse them at start."""
    for name, tensor in loaded.model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{loaded.source}: its weights hold NaN or infinite values ({name}); the model is broken")


def create_app(settings: Settings) -> FastAPI:
    """The FastAPI application for `settings` (the model loads here, once)."""
    settings.check()
    model = Model(settings)
    max_bytes = int(settings.max_mb * 1e6)
    limit = settings.max_files * (max_bytes + PART_SLACK)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(model.batcher())
        yield
        task.cancel()

    # No /docs or /redoc: both load their scripts from a CDN, which an offline hospital network cannot reach.
    # The schema is under /api/, behind the token like the rest of the API.
    app = FastAPI(
        title="skinlesion",
        version="1",
        lifespan=lifespan,
        description="Decision support for dermoscopic images: " + DISCLAIMER,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    if settings.token is None:  # a page on another site, its name rebound to 127.0.0.1, gets 400 (DNS rebinding)
        app.add_middleware(HostCheck, names=settings.host_names())

    def authorised(request: Request) -> None:
        if settings.token is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(given.encode(), settings.token.encode()):
            raise HTTPException(status_code=401, detail="unauthorised")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return resources.files("skinlesion").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """Public: says the server is up, and nothing about the model (that is /api/model, behind the token)."""
        return {"status": "ok"}

    @app.get("/api/model", dependencies=[Depends(authorised)])
    def model_card() -> dict[str, Any]:
        return model.model_card() | {"limits": {"max_files": settings.max_files, "max_mb": settings.max_mb}}

    @app.get("/api/openapi.json", include_in_schema=False, dependencies=[Depends(authorised)])
    def openapi() -> dict[str, Any]:
        return app.openapi()

    async def read_uploads(request: Request) -> list[tuple[UploadFile, int]]:
        """The files of a multipart body and how many bytes each had; 413 as soon as a limit is passed."""
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            return []  # no body is read: the caller answers 400
        parser = UploadParser(request, limit, settings.max_files, max_bytes)
        try:
            form = await parser.parse()
        except TooLarge:
            detail = f"request too large: more than {limit / 1e6:g} MB (at most {settings.max_files} files)"
            raise HTTPException(status_code=413, detail=detail) from None
        except MultiPartException as exc:
            if parser.too_many_files():
                detail = f"more than {settings.max_files} files: at most {settings.max_files} per request"
                raise HTTPException(status_code=413, detail=detail) from None
            raise HTTPException(status_code=400, detail=exc.message) from None
        files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
        return [(f, parser.received.get(id(f), 0)) for f in files]

    @app.post("/api/predict", dependencies=[Depends(authorised)])
    async def predict(request: Request, tta: int = Query(0, ge=0, le=1), cam: int = Query(0, ge=0, le=1)):
        started = time.perf_counter()
        if int(request.headers.get("content-length") or 0) > limit:  # known before the body: no need to read it
            raise HTTPException(status_code=413, detail=f"request too large (at most {settings.max_files} files)")
        uploads = await read_uploads(request)
        if not uploads:
            raise HTTPException(status_code=400, detail="no file: send one or more images in the field 'files'")
        entries, pending = [], []
        for upload, size in uploads:
            data = await upload.read(max_bytes + 1)
            await upload.close()
            # Decoding and resizing a photo take milliseconds: off the event loop.
            decoded, reason, kind = await asyncio.to_thread(decode_upload, data, max_bytes, size, loaded=model.loaded)
            entry: dict[str, Any] = {"image": upload.filename or ""}
            log.info("upload: %d bytes, format %s, %s", size, kind, "ok" if reason is None else "rejected")
            if reason is not None:
                entry["error"] = reason
            else:
                tensor, (width, height) = decoded
                entry["crop"] = inference.crop_box(width, height)  # the square the model saw, for the page's outline
                item = _Item(tensor, bool(tta))
                if not (cam and not tta):  # a heat map without TTA brings its own probabilities (one pass)
                    await model.queue.put(item)
                pending.append((entry, item))
            entries.append(entry)
        for entry, item in pending:
            if cam:
                probs, score, heat = await asyncio.to_thread(model.with_heat_map, item.image)
                if tta:
                    probs, score = await item.done
                entry.update(model.describe(probs, score))
                # No heat map for an image flagged as unfamiliar: a map over plain skin drew a dark blob that
                # read as a lesion. The map is never made into a picture, and the entry carries none.
                if not (entry["ood"] or {}).get("flag"):
                    entry.update(await asyncio.to_thread(heatmap.heat_map_pictures, item.image, heat))
            else:
                entry.update(model.describe(*await item.done))
        ok = sum("error" not in e for e in entries)
        log.info(
            "predict: %d files, %d answered, tta=%d cam=%d, %.0f ms",
            len(entries),
            ok,
            tta,
            cam,
            (time.perf_counter() - started) * 1000,
        )
        return JSONResponse(entries, status_code=200 if ok else 422)

    return app


def serve_command(
    checkpoint: Path,
    host: str,
    port: int,
    token: str | None,
    device: str,
    max_mb: float,
    max_files: int,
    batch: int = BATCH,
    allow_hosts: tuple[str, ...] = (),
) -> int:
    """CLI entry: load the model and serve until interrupted."""
    import os

    token = token or os.environ.get("SKINLESION_TOKEN") or None
    settings = Settings(Path(checkpoint), token, max_mb, max_files, device, batch, host, tuple(allow_hosts))
    settings.check()
    if host not in ("127.0.0.1", "localhost", "::1") and token is None:
        print(
            f"warning: serving on {host} without --token: anyone who can reach this machine on the network "
            "can use it and send it images",
            flush=True,
        )
        names = ", ".join(settings.host_names())
        print(f"note: without --token, only requests to {names} are answered (--allow-host adds one)", flush=True)
    if token is not None and allow_hosts:
        print(
            "note: --allow-host has no effect with --token: the token guards the API, and no Host is checked",
            flush=True,
        )
    sock = listen(host, port)  # before the model loads: a port in use is one line, not "serving" then a traceback
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    app = create_app(settings)
    print(f"serving {checkpoint} on http://{host}:{sock.getsockname()[1]}/ (Ctrl-C to stop)", flush=True)
    run_server(app, sock)
    return 0


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on `host`:`port`, or a one-line UserError naming them. `serve` binds before it says
    "serving": uvicorn binds only after its start-up and then logs the failure, so a second `serve` on the same
    port printed "serving ... on http://..." and then died."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart right after a stop finds it free
    try:
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise UserError(
            f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); if another server (a second "
            "`skinlesion serve`?) holds the port, stop it or choose another --port"
        ) from None
    return sock


def run_server(app: FastAPI, sock: socket.socket) -> None:
    """Serve `app` on the bound `sock` until interrupted."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])

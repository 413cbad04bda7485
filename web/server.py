"""The interactive page's HTTP side (app.py is its command line): index.html, beside this file (one self-written
page: no CDN, no web fonts, no analytics; its Content-Security-Policy lets it load nothing from elsewhere), served on
the loopback address only. A run answers with NDJSON, one JSON object per line, so that the page shows each step's
latent mask and image as soon as it is decoded; the inference is web/inference.py. Bad input gets a one-line message
and status 400, never a traceback; the server keeps running."""
from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import socket
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool

from models.schedules import GAMMAS
from utils.image import IMAGE_SIZE, read_rgb
from web.inference import (MAX_SAMPLES, MAX_STEPS, MAX_UPLOAD_BYTES, Engine, InputError, inpaint_steps, random_hole,
                           read_image)

HOST = "127.0.0.1"  # loopback only: the page is for the person at this machine
PAGE = Path(__file__).resolve().with_name("index.html")
MAX_RUN_BYTES = 2 ** 20  # a run request: a 64x64 PNG and 4096 mask characters, well under this
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
       "connect-src 'self'; form-action 'none'; base-uri 'none'")
FACE_SPLITS = {"val": "val", "test": "test_gt"}  # page name -> folder of prepare_dataset.py's layout
log = logging.getLogger("app")


class FaceFolders:
    """The prepared val and test faces (prepare_dataset.py), listed once; missing folders just offer none."""

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir)
        self.files = {split: sorted((self.data_dir / folder).glob("*.png"))
                      for split, folder in FACE_SPLITS.items()}

    def counts(self) -> dict[str, int]:
        return {split: len(files) for split, files in self.files.items() if files}

    def read(self, split: str, index: int) -> tuple[np.ndarray, str]:
        if split not in self.files:
            raise InputError(f"unknown face folder {split!r}; use {' or '.join(self.files)}")
        files = self.files[split]
        if not files:
            raise InputError(f"no {split} faces in {self.data_dir} (run prepare_dataset.py); upload an image instead")
        if not 0 <= index < len(files):
            raise InputError(f"face number {index} is not in 0..{len(files) - 1}")
        try:
            return read_rgb(files[index]), f"{split}/{files[index].name}"
        except ValueError as e:
            raise InputError(str(e)) from None


def png_data_url(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def parse_data_url(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or not value.startswith("data:") or ";base64," not in value:
        raise InputError(f"{what} must be an image as a base64 data URL")
    try:
        return base64.b64decode(value.split(",", 1)[1], validate=True)
    except binascii.Error:
        raise InputError(f"{what}: damaged base64 data") from None


def parse_hole(value: Any) -> np.ndarray:
    """The page's mask: IMAGE_SIZE**2 characters, row by row, '1' = hole, '0' = known."""
    if not isinstance(value, str) or len(value) != IMAGE_SIZE ** 2 or set(value) - {"0", "1"}:
        raise InputError(f"the mask must be {IMAGE_SIZE ** 2} characters 0 (known) or 1 (hole)")
    return (np.frombuffer(value.encode("ascii"), np.uint8) == ord("1")).reshape(IMAGE_SIZE, IMAGE_SIZE)


def hole_string(hole: np.ndarray) -> str:
    return "".join("01"[v] for v in hole.ravel().astype(int))


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or InputError when it passes `limit` bytes. A body up to 4x the limit is read to its end
    first, so that the client, still sending, gets the message rather than a reset connection."""
    too_big = InputError(f"the upload is larger than {limit / 2 ** 20:g} MB, the limit")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > 4 * limit:
        raise too_big
    body, size = bytearray(), 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            body += chunk
        elif size > 4 * limit:
            break
    if size > limit:
        raise too_big
    return bytes(body)


def _event_json(event: dict[str, Any]) -> bytes:
    """An inpaint_steps event as one NDJSON line, its arrays as PNG data URLs (lists of them per sample)."""
    out = {}
    for key, value in event.items():
        if isinstance(value, np.ndarray):
            value = png_data_url(value) if key == "masked" else [png_data_url(v) for v in value]
        out[key] = value
    return (json.dumps(out) + "\n").encode()


def _stream(events: Iterator[dict[str, Any]]) -> Iterator[bytes]:
    """NDJSON lines; a failure after the first line can no longer change the status, so it becomes an event."""
    try:
        for event in events:
            yield _event_json(event)
    except InputError as e:
        yield _event_json({"type": "error", "message": str(e)})
    except Exception as e:
        log.exception("inpainting failed")
        yield _event_json({"type": "error", "message": f"internal error ({type(e).__name__}); see the server's "
                                                        "console"})


def create_app(engine: Engine, faces: FaceFolders, config_name: str = "") -> FastAPI:
    """The page and its JSON API around one loaded engine."""
    app = FastAPI(title="MaskGIT inpainting", docs_url=None, redoc_url=None, openapi_url=None)
    page = PAGE.read_text(encoding="utf-8")

    @app.exception_handler(InputError)
    async def input_error(request: Request, e: InputError) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def bad_parameters(request: Request, e: RequestValidationError) -> JSONResponse:
        where = [f"{'.'.join(str(p) for p in err.get('loc', ())[1:])}: {err.get('msg', '')}" for err in e.errors()]
        return JSONResponse({"error": "; ".join(where) or "bad request"}, status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse({"error": f"internal error ({type(e).__name__}); see the server's console"},
                            status_code=500)

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": CSP, "Cache-Control": "no-store"})

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return {"defaults": asdict(engine.defaults), "schedules": list(GAMMAS),
                "faces": faces.counts(), "max_steps": MAX_STEPS, "max_samples": MAX_SAMPLES,
                "max_upload_bytes": MAX_UPLOAD_BYTES, "model": f"{config_name} on {engine.device}"}

    @app.get("/api/face")
    def face(split: str, index: int) -> dict[str, Any]:
        image, name = faces.read(split, index)
        return {"image": png_data_url(image), "name": name, "notes": []}

    @app.post("/api/upload")
    async def upload(request: Request) -> dict[str, Any]:
        image, notes = await run_in_threadpool(read_image, await read_body(request, MAX_UPLOAD_BYTES))
        return {"image": png_data_url(image), "notes": notes}

    @app.get("/api/random-hole")
    def new_hole(kind: str) -> dict[str, str]:
        return {"hole": hole_string(random_hole(kind, np.random.default_rng()))}

    @app.post("/api/inpaint")
    async def run(request: Request) -> StreamingResponse:
        try:
            body = json.loads(await read_body(request, MAX_RUN_BYTES))
        except (ValueError, UnicodeDecodeError):
            raise InputError("the request is not JSON") from None
        if not isinstance(body, dict) or not isinstance(body.get("settings", {}), dict):
            raise InputError("the request must be a JSON object with face, hole and settings")
        image, _ = read_image(parse_data_url(body.get("face"), "face"))
        hole = parse_hole(body.get("hole"))
        settings = engine.defaults.updated(body.get("settings", {}))
        return StreamingResponse(_stream(inpaint_steps(engine, image, hole, settings)),
                                 media_type="application/x-ndjson", headers={"Cache-Control": "no-store"})

    return app


def listen(port: int) -> socket.socket:
    """A socket bound to the loopback address (port 0: any free one), so a busy port is a clear error at start."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((HOST, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"--port {port}: cannot listen on {HOST}:{port} ({e.strerror}); pass another --port") from None
    return sock


def server(app: FastAPI) -> uvicorn.Server:
    """A uvicorn server for `app`; run it with .run(sockets=[listen(port)])."""
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))

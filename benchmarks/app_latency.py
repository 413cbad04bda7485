"""Answer time of the interactive page (app.py): one 64x64 inpainting at T=8 with the shipped models.

The model is loaded once, as the server does; then each run inpaints one face with a fresh stroke hole (the test
set's hole generator, seeds 0..N-1) with the demo config's decoding. Two times per run:
  handler: web.inference.inpaint_steps to its result (the transformer decode and all 8 step images);
  HTTP:    POST /api/inpaint to a server on loopback, from the request to the last NDJSON line (adds the PNG and
           JSON encoding and the transfer), which is what the page waits for.
The face is cat_face/val/image_00000.png when prepared, else a synthetic one (speed does not depend on it).
Target (issue 13): under 1 s. The last line is the median HTTP answer time:  answer X.XXX s

    python benchmarks/app_latency.py --runs 10
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.image import read_rgb  # noqa: E402
from utils.masks import stroke_mask  # noqa: E402
from web.inference import inpaint_steps, load_engine  # noqa: E402
from web.server import FaceFolders, create_app, hole_string, listen, png_data_url, server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def face_image() -> tuple[np.ndarray, str]:
    path = REPO / "cat_face" / "val" / "image_00000.png"
    if path.is_file():
        return read_rgb(path), str(path.relative_to(REPO))
    y, x = np.mgrid[0:64, 0:64] / 63
    return (np.stack([x, y, (x + y) / 2], -1) * 255).astype(np.uint8), "synthetic"


def summary(name: str, seconds: list[float]) -> str:
    return f"{name}: median {statistics.median(seconds):.3f} s, min {min(seconds):.3f} s, max {max(seconds):.3f} s"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--config", default=str(REPO / "configs" / "MaskGit_demo.yml"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    engine = load_engine(args.config)
    print(f"model loaded once in {time.perf_counter() - start:.2f} s; {torch.get_num_threads()} torch threads; "
          f"decoding {engine.defaults}")
    face, source = face_image()
    holes = [stroke_mask(np.random.default_rng(seed)) for seed in range(args.runs)]
    print(f"face: {source}; stroke holes {np.mean([h.mean() for h in holes]):.1%} of the pixels on average")
    list(inpaint_steps(engine, face, holes[0], engine.defaults))  # warm-up: first-call allocations

    handler = []
    for hole in holes:
        t = time.perf_counter()
        events = list(inpaint_steps(engine, face, hole, engine.defaults))
        handler.append(time.perf_counter() - t)
        assert events[-1]["type"] == "result" and len(events) == engine.defaults.total_iter + 2
    print(summary("handler", handler))

    sock = listen(0)
    srv = server(create_app(engine, FaceFolders(REPO / "cat_face")))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/api/inpaint"
    http = []
    try:
        for hole in holes:
            body = json.dumps({"face": png_data_url(face), "hole": hole_string(hole), "settings": {}}).encode()
            t = time.perf_counter()
            with urllib.request.urlopen(urllib.request.Request(url, body, {"Content-Type": "application/json"}),
                                        timeout=60) as r:
                last = r.read().splitlines()[-1]
            http.append(time.perf_counter() - t)
            assert json.loads(last)["type"] == "result"
    finally:
        srv.should_exit = True
        thread.join(10)
    print(summary("HTTP", http))
    print(f"answer {statistics.median(http):.3f} s")


if __name__ == "__main__":
    main()

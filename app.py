"""The interactive inpainting page: pick or upload a cat face, draw a hole, and watch MaskGIT fill it step by step.

    python app.py          # then open http://127.0.0.1:7860

Loads the models of --config (the shipped ones) once and serves the page (web/server.py) on the
loopback address only.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from utils.cli import OneLineParser, check_device
from utils.config import resolve_path
from web.inference import load_engine
from web.server import HOST, FaceFolders, create_app, listen, server


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, default=7860, help=f"port on {HOST} (0: any free one)")
    p.add_argument("--config", default="configs/MaskGit_demo.yml", help="MaskGit config (default: the shipped models)")
    p.add_argument("--data", default="./cat_face", help="prepared dataset whose val/ and test_gt/ faces are offered")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        p.error(f"--port must be in 0..65535, got {args.port}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        sock = listen(args.port)
        engine = load_engine(resolve_path(args.config), check_device(args.device))
    except (ValueError, OSError) as e:  # a busy port, a bad config or checkpoint: one line, as every script here
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    faces = FaceFolders(resolve_path(args.data))
    counts = ", ".join(f"{n} {split}" for split, n in faces.counts().items()) or "none (upload images)"
    print(f"MaskGIT inpainting page: http://{HOST}:{sock.getsockname()[1]}  (faces: {counts}; Ctrl-C stops)",
          flush=True)
    server(create_app(engine, faces, Path(args.config).name)).run(sockets=[sock])


if __name__ == "__main__":
    main()

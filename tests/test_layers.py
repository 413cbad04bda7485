"""Imports run one way: scripts -> training (the trainers) or web (the page) -> sampler -> models -> utils; the
trainers and the page sit side by side and neither imports the other; no module imports a script; only the page
serves HTTP, so that sampler/ is decoding only; the FID folder imports nothing from the repository, and
utils/fid.py is the only module that reaches into it."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tiny_maskgit import REPO

BELOW = {  # each package may import itself and these
    "utils": set(),
    "models": {"utils"},
    "sampler": {"models", "utils"},
    "training": {"sampler", "models", "utils"},
    "web": {"sampler", "models", "utils"},
}
HTTP_STACK = {"fastapi", "starlette", "uvicorn"}
FID_DIR = REPO / "faster-pytorch-fid"
FID_MODULES = {p.stem for p in FID_DIR.glob("*.py")}
SCRIPTS = {p.stem for p in REPO.glob("*.py")}


def imported(path: Path) -> set[str]:
    """Top-level names of everything `path` imports (relative imports stay in their own package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def sources(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def test_packages_import_only_their_own_layer_and_those_below():
    wrong = []
    for package, below in BELOW.items():
        forbidden = (set(BELOW) - below - {package}) | SCRIPTS | {"benchmarks", "tests"}
        wrong += [f"{p.relative_to(REPO)} imports {name}" for p in sources(package) for name in imported(p) & forbidden]
    wrong += [f"{p.relative_to(REPO)} imports {name}" for p in sources("benchmarks") for name in imported(p) & SCRIPTS]
    assert not wrong, wrong


def test_only_the_page_serves_http():
    serving = {str(p.relative_to(REPO)) for package in BELOW for p in sources(package) if imported(p) & HTTP_STACK}
    assert serving and all(path.startswith("web/") for path in serving), serving


def test_the_fid_folder_stands_alone_and_has_one_bridge():
    repo_names = set(BELOW) | SCRIPTS | {"benchmarks"}
    assert not {name for p in FID_DIR.glob("*.py") for name in imported(p) & repo_names}
    reaching = {str(p.relative_to(REPO)) for folder in [*BELOW, "benchmarks"] for p in sources(folder)
                if imported(p) & FID_MODULES}
    assert reaching == {"utils/fid.py"}


def test_a_copy_of_the_fid_folder_runs_anywhere(tmp_path):
    """Lab users copy faster-pytorch-fid/ around: away from the repository its command line still starts."""
    copy = shutil.copytree(FID_DIR, tmp_path / "fid", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "fid_score_gpu.py", "--help"], cwd=copy, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and "--predicted-path" in run.stdout, run.stderr[-2000:]

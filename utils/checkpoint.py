"""Atomic checkpoint writing and loading with errors a user can act on.

Two kinds of files exist: *weights* (a plain state_dict, what the lab loads with strict=True)
and *training state* (a dict tagged TRAINING_STATE_TAG holding model, optimizer, step, RNG, ...).
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

TRAINING_STATE_TAG = "maskgit-training-state-v1"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used as asked; the message says what to do."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`.

    A crash at any moment leaves either the old file or the new one, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; checkpoints are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(path: str | Path, weights_only: bool = True) -> Any:
    """weights_only=False only for training states, which hold Python/NumPy RNG states and are ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; check the path (or train one first)")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # truncated zip, not a torch file, ...
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}); the file is truncated "
                              "or not a PyTorch checkpoint: re-download it or resume from an earlier one") from e


def is_training_state(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == TRAINING_STATE_TAG


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a plain state_dict; refuses a training-state file with a pointer to the right flag."""
    obj = _load(path)
    if is_training_state(obj):
        raise CheckpointError(f"{path}: this is a training-state file, not a weights file; pass the weights file "
                              "saved beside it (or resume training from it with the resume flag)")
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state_dict of tensors; pass a weights file")
    return obj


def load_training_state(path: str | Path) -> dict[str, Any]:
    """Load a training-state file; refuses a plain weights file."""
    obj = _load(path, weights_only=False)
    if not is_training_state(obj):
        raise CheckpointError(f"{path}: this is a weights file, not a training state; resume needs the "
                              "training-state file written by the trainer")
    return obj


def load_state_dict_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict=True) that turns key/shape mismatches into one readable line."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (first: {wrong[0]})")
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]})")
        raise CheckpointError(f"{source}: checkpoint does not fit the model config: {'; '.join(parts)}; "
                              "use the config that made the checkpoint")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

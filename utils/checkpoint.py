"""Atomic checkpoint writing and loading with errors a user can act on.

Two kinds of files exist: *weights* (a plain state_dict, what the lab loads with strict=True)
and *training state* (a dict tagged TRAINING_STATE_TAG holding model, optimizer, step, RNG, ...).
"""
from __future__ import annotations

import glob
import io
import os
import random
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch

TRAINING_STATE_TAG = "maskgit-training-state-v1"
SHARD_TAG = "maskgit-weight-shard-v1"
SHARD_LIMIT = 16 * 2 ** 20  # the largest file the GPU machine returns
_SHARD_NAME = "{prefix}-{index:02d}-of-{count:02d}.pt"
# torch.save's bytes beyond the tensor data: the zip and pickle framing per shard, and per tensor its zip entry
# (64-byte aligned) and pickled key; generous, since every shard's real size is checked before it is written
_SHARD_FRAMING, _TENSOR_FRAMING = 64 * 1024, 1024


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used as asked; the message says what to do."""


class OutputError(OSError):
    """An output that cannot be written (folder missing or not writable, disk full); the message says what to do."""


class _RecordingWriter:
    """File wrapper that keeps the OSError of a failed write: torch.save reports it as an opaque RuntimeError."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], durable: bool = True) -> None:
    """Call write(f) on a temporary file in the same folder, fsync (if `durable`), then rename it over `path`.

    A crash at any moment leaves either the old file or the new one, never a truncated one (at worst a hidden
    `.NAME.*.tmp` beside it). A write that fails (disk full, folder not writable) raises OutputError and leaves
    the old file untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OutputError(f"{path.parent}: cannot create files there ({e.strerror or e}); "
                          "choose a writable folder") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write ({e.strerror or e}); free some disk space or choose another "
                          f"folder (an existing {path.name} is left unchanged)") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def half_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state_dict in fp16 on the CPU, as trained weights are committed (half the bytes); integer buffers keep
    their dtype."""
    return {k: (v.half() if v.is_floating_point() else v).detach().cpu().clone() for k, v in state.items()}


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save through atomic_write: a checkpoint on disk is always complete. The temporary file of a run
    killed while writing `path` (as large as the checkpoint) is removed by the next successful save."""
    def write(f: BinaryIO) -> None:
        writer = _RecordingWriter(f)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is None:
                raise
            raise writer.error from None
    atomic_write(path, write)
    path = Path(path)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)


def ensure_writable_dir(path: str | Path, flag: str) -> Path:
    """Create the output folder `path` and check that files can be made in it, so that a bad output folder
    fails at once in one line instead of after hours of work."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise OutputError(f"{flag} {path}: cannot write there ({e.strerror or e}); choose a writable folder") from None
    return path


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


def _has_training_state_tag(path: str | Path) -> bool:
    """Whether the pickle inside a torch zip file holds TRAINING_STATE_TAG: read as bytes, never unpickled, since
    weights_only loading refuses the RNG states a training state carries."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(name.endswith("/data.pkl") and TRAINING_STATE_TAG.encode() in zf.read(name)
                       for name in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a plain state_dict; refuses a training-state file with a pointer to the right flag."""
    wrong_kind = CheckpointError(f"{path}: this is a training-state file, not a weights file; pass the weights file "
                                 "saved beside it (or resume training from it with the resume flag)")
    try:
        obj = _load(path)
    except CheckpointError:
        if _has_training_state_tag(path):
            raise wrong_kind from None
        raise
    if is_training_state(obj):
        raise wrong_kind
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


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_shards(state: dict[str, torch.Tensor], folder: str | Path, prefix: str,
                max_bytes: int = SHARD_LIMIT) -> list[Path]:
    """Write a state_dict as files PREFIX-II-of-NN.pt of at most `max_bytes` each (tensors kept whole, in order),
    for a channel that carries only files up to a size (the GPU machine returns at most 16 MiB a file); an older
    set of the same prefix is removed. load_shards joins them. Returns the paths written."""
    groups: list[dict[str, torch.Tensor]] = [{}]
    room = max_bytes - _SHARD_FRAMING
    used = 0
    for key, value in state.items():
        cost = value.nbytes + _TENSOR_FRAMING + 2 * len(key)
        if cost > room:
            raise ValueError(f"{key}: {value.nbytes} bytes, larger than a shard of {max_bytes} bytes")
        if used + cost > room:
            groups.append({})
            used = 0
        groups[-1][key] = value.detach().cpu().clone()  # a view would save its whole storage
        used += cost
    folder = Path(folder)
    paths = [folder / _SHARD_NAME.format(prefix=prefix, index=i + 1, count=len(groups)) for i in range(len(groups))]
    for i, (path, tensors) in enumerate(zip(paths, groups)):
        data = _torch_bytes({"format": SHARD_TAG, "index": i + 1, "count": len(groups), "tensors": tensors})
        if len(data) > max_bytes:  # the framing estimate was wrong: a bug, not a user error
            raise RuntimeError(f"{path.name}: {len(data)} bytes exceed the shard limit {max_bytes}")
        atomic_write(path, lambda f: f.write(data))
    for old in _shard_files(folder, prefix):
        if old not in paths:
            old.unlink()
    return paths


def _shard_files(folder: Path, prefix: str) -> list[Path]:
    pattern = re.compile(re.escape(prefix) + r"-\d+-of-\d+\.pt")
    return sorted(p for p in folder.glob(f"{glob.escape(prefix)}-*-of-*.pt") if pattern.fullmatch(p.name))


def load_shards(folder: str | Path, prefix: str) -> dict[str, torch.Tensor]:
    """The state_dict that save_shards wrote into `folder` under `prefix`, joined; a missing, foreign or damaged
    shard raises CheckpointError naming it."""
    folder = Path(folder)
    files = _shard_files(folder, prefix)
    if not files:
        raise CheckpointError(f"{folder}: no weight shards {prefix}-II-of-NN.pt; pass the folder that holds them")
    count = int(files[0].stem.rsplit("-of-", 1)[1])
    expected = [folder / _SHARD_NAME.format(prefix=prefix, index=i + 1, count=count) for i in range(count)]
    missing = [p.name for p in expected if p not in files]
    if missing or len(files) != count:
        raise CheckpointError(f"{folder}: shards of {prefix} are incomplete or mixed (missing: "
                              f"{', '.join(missing) or 'none'}; found {len(files)} for {count}); copy the whole set")
    state: dict[str, torch.Tensor] = {}
    for i, path in enumerate(expected):
        shard = _load(path)
        if not (isinstance(shard, dict) and shard.get("format") == SHARD_TAG and shard.get("index") == i + 1
                and shard.get("count") == count):
            raise CheckpointError(f"{path}: not shard {i + 1} of {count} written by save_shards")
        clash = state.keys() & shard["tensors"].keys()
        if clash:
            raise CheckpointError(f"{path}: tensor {sorted(clash)[0]} is also in an earlier shard")
        state.update(shard["tensors"])
    return state

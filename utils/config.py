"""YAML config loading with one clear line for a missing file or key, and where the paths in a config point."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key."""


def resolve_path(path: str | Path) -> Path:
    """Config paths are relative to the working directory, as in the lab; fall back to the repository root
    so that scripts also work when started from elsewhere."""
    path = Path(path)
    if path.is_absolute() or path.exists() or not (REPO_ROOT / path).exists():
        return path
    return REPO_ROOT / path


def load_config(path: str | Path, required: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Load a YAML file (found as resolve_path finds it); `required` maps a section ('' = top level) to keys that
    must be present."""
    path = resolve_path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; pass an existing YAML file")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e.__class__.__name__}); fix the syntax") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for section, keys in (required or {}).items():
        require_keys(cfg if section == "" else cfg.get(section), keys, section, path)
    return cfg


def require_keys(block: Any, keys: list[str], section: str, path: str | Path) -> None:
    """ConfigError naming the first of `keys` missing from the mapping `block` (at `section`, dotted), with a
    spelling hint when a key present there is close to it: a typo reads as a missing key otherwise."""
    if not isinstance(block, dict):
        raise ConfigError(f"{path}: missing section '{section}'")
    for key in keys:
        if key not in block:
            near = difflib.get_close_matches(key, [k for k in block if isinstance(k, str) and k not in keys], n=1)
            hint = f" ('{near[0]}' looks like a misspelling of it)" if near else ""
            name = f"{section}.{key}" if section else key
            raise ConfigError(f"{path}: missing key '{name}'{hint}; see configs/ for a complete example")


def require_positive_ints(block: dict[str, Any], keys: list[str], section: str, path: str | Path) -> None:
    """ConfigError for a size among `keys` (those present) that is not a positive whole number or a list of them:
    256.0, "256" or -1 would otherwise fail deep inside the model's construction."""
    for key in keys:
        value = block.get(key, 1)
        items = value if isinstance(value, list) and value else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in items):
            raise ConfigError(f"{path}: '{section}.{key}' is {value!r}; it must be a positive whole number "
                              f"(or a list of them for channel lists)")

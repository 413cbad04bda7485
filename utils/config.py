"""YAML config loading with one clear line for a missing file or key."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key."""


def load_config(path: str | Path, required: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Load a YAML file; `required` maps a section ('' = top level) to keys that must be present."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; pass an existing YAML file")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e.__class__.__name__}); fix the syntax") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for section, keys in (required or {}).items():
        block = cfg if section == "" else cfg.get(section)
        if not isinstance(block, dict):
            raise ConfigError(f"{path}: missing section '{section}'")
        for key in keys:
            if key not in block:
                where = f"'{section}.{key}'" if section else f"'{key}'"
                raise ConfigError(f"{path}: missing key {where}; see configs/ for a complete example")
    return cfg

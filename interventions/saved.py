"""Saved method configs: `interventions_config.json`, written by `Handle.save_pretrained` and the calibration tools,
read by `iv.wrap(model, DIR_OR_FILE)` and the CLI's `--params`.

The file is `Handle.config` (schema, library version, the stack with every parameter, head lists inline) plus a
`model` block: the id the stack was made for and the shape its layer and head indices refer to. Loading it on a
model of another shape is refused, since layer and head lists would silently point elsewhere.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError

CONFIG_NAME = "interventions_config.json"
#: the shape fields that must match for a config's layer and head indices to mean the same thing
SHAPE_KEYS = ("num_layers", "num_heads", "num_kv_heads")


def config_path(location: str | os.PathLike) -> Path | None:
    """The config file that `location` names (a folder holding `interventions_config.json`, or a `.json` file),
    or `None` when `location` does not look like a path (then it is a method name)."""
    path = Path(location).expanduser()
    if path.is_dir():
        return path / CONFIG_NAME
    if path.suffix == ".json" or isinstance(location, os.PathLike):
        return path
    return None


def read_config(path: Path) -> dict[str, Any]:
    """Read a saved config file.

    Raises:
        ConfigError: the file is missing, not JSON, or not an object with a `stack`.
    """
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no saved interventions config at {str(path)!r} (write one with "
                          "handle.save_pretrained(folder))") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read interventions config {str(path)!r}: {e}") from e
    if not isinstance(data, Mapping) or "stack" not in data:
        raise ConfigError(f"{str(path)!r} is not an interventions config (expected keys schema, library, model, "
                          f"stack; got {sorted(data) if isinstance(data, Mapping) else type(data).__name__})")
    return dict(data)


def write_config(config: Mapping[str, Any], folder: str | os.PathLike) -> Path:
    """Write `config` as `folder/interventions_config.json` (sorted keys, indented); return the file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CONFIG_NAME
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def model_block(model: Any, info: Any, model_id: str | None = None) -> dict[str, Any]:
    """What a config records about the model it was made for: id, family and shape."""
    name = model_id or getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "") or None
    return {"id": name, "family": info.family, "num_layers": info.num_layers, "num_heads": info.num_heads,
            "num_kv_heads": info.num_kv_heads}


def check_shape(made_for: Mapping[str, Any], info: Any) -> None:
    """Refuse a config whose recorded shape differs from the model's.

    Raises:
        ConfigError: naming both shapes and the model the config was made for.
    """
    if not isinstance(made_for, Mapping):
        raise ConfigError(f"the config's 'model' block must be an object; got {made_for!r}")
    unknown = set(made_for) - {"id", "family", *SHAPE_KEYS}
    if unknown:
        raise ConfigError(f"the config's 'model' block has unknown keys {sorted(unknown)}; expected id, family, "
                          f"{', '.join(SHAPE_KEYS)}")
    theirs = {k: made_for[k] for k in SHAPE_KEYS if k in made_for}
    ours = {k: getattr(info, k) for k in theirs}
    if theirs != ours:
        shape = ", ".join(f"{k}={v}" for k, v in theirs.items())
        have = ", ".join(f"{k}={v}" for k, v in ours.items())
        raise ConfigError(f"this interventions config was made for {made_for.get('id') or 'another model'} "
                          f"({made_for.get('family', '?')}: {shape}); this model ({info.family}) has {have}; its "
                          "layer and head indices would not fit: calibrate or write a config for this model")

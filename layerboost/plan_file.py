"""A plan file is all a user needs: `export|heal|bench|eval plan=<file>` adopt the settings it was made with.

A best file (and `plan.json` in an exported folder) records, under `made_with`, the model, data, workload,
option, proxy and transfer settings its numbers were measured with (`WorkbenchSettings.record`). A verb given
such a file composes its config as usual, then takes every recorded value in place of the config's, so the
same bank is rebuilt (or found in the cache) whatever the user typed. An override the user typed that
contradicts the file is refused in one line naming the field and both values; overrides of anything the file
does not record (`out=`, `device=`, `dtype=`, `heal.*`, `bench.*`, `eval.*`, ...) are taken.
"""
from __future__ import annotations

import json
from pathlib import Path

from layerboost_core.errors import UserError

RECORD_KEY = "made_with"
# Recorded, but they do not change a result: the user's value is taken without a word.
NEUTRAL = ("model.fallback_source", "proxy.batch_size")


def recorded_settings(spec: str) -> dict | None:
    """The `made_with` block of the plan file `spec`, or None (a compact plan string, a folder, an older file)."""
    path = Path(spec)
    if not (spec.endswith(".json") and path.is_file()):
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # load_plan reports an unreadable file with its own one-line error
    made = data.get(RECORD_KEY) if isinstance(data, dict) else None
    return made if isinstance(made, dict) and made else None


def flatten(section: dict, prefix: str = "") -> dict:
    """{"a.b.c": leaf} of nested mappings (lists and scalars are leaves)."""
    out = {}
    for key, value in section.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def override_keys(overrides: list[str]) -> list[str]:
    """The config keys the user's `key=value` overrides name (`model=x` names the whole `model` section)."""
    keys = []
    for item in overrides:
        key, sep, _ = item.partition("=")
        if sep:
            keys.append(key.lstrip("+~").split("@")[0])
    return keys


def _touched(key: str, named: list[str], changed: set[str]) -> bool:
    """True when the user set `key`: an override names it or a section above it, or the composed value differs
    from the default config's (a group choice such as `model=gemma3-270m` or `workload=chat`)."""
    return key in changed or any(key == n or key.startswith(f"{n}.") for n in named)


def adopt_plan_settings(cfg, overrides: list[str], defaults) -> object:
    """`cfg` with the settings of its `plan=` file in place (see the module docstring); `defaults` is the
    config composed without overrides. Unchanged when the plan is not a file with recorded settings."""
    from omegaconf import OmegaConf, open_dict

    spec = str(cfg.get("plan") or "")
    made = recorded_settings(spec)
    if made is None:
        return cfg
    asked = flatten(OmegaConf.to_container(cfg, resolve=True))
    default = flatten(OmegaConf.to_container(defaults, resolve=True))
    changed = {key for key, value in asked.items() if default.get(key, value) != value}
    named = override_keys(overrides)
    recorded = flatten(made)
    for key, value in recorded.items():
        current = asked.get(key)
        if key not in NEUTRAL and _touched(key, named, changed) and current is not None and current != value:
            raise UserError(f"{key}: {spec} was made with {json.dumps(value)}, but this command asks for "
                            f"{json.dumps(current)}; drop the override (the file's settings are used)")
    with open_dict(cfg):
        for key, value in recorded.items():
            if not (key in NEUTRAL and _touched(key, named, changed)):
                OmegaConf.update(cfg, key, value, merge=False)
    return cfg

"""Write a run config (``TrainConfig.to_dict()``) as TOML that ``load_config`` reads back.

Sections are tables; ``None`` is written as the string "none", which the config reader takes
as unset (the standard library reads TOML but does not write it).
"""

from __future__ import annotations

import json
from typing import Any


def _value(v: Any) -> str:
    if v is None:
        return '"none"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if v == v and v not in (float("inf"), float("-inf")) else f'"{v}"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a TOML basic string is a JSON string


def to_toml(cfg: dict[str, Any], prefix: str = "") -> str:
    """Top-level keys first, then one ``[section]`` per nested dict (recursively)."""
    lines = [f"{k} = {_value(v)}" for k, v in cfg.items() if not isinstance(v, dict)]
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, v in cfg.items():
        if isinstance(v, dict):
            name = f"{prefix}{k}"
            out += f"\n[{name}]\n" + to_toml(v, name + ".")
    return out

"""What hf.py and meta.py share: the error they raise and how they read a JSON config."""

from __future__ import annotations

import json
from pathlib import Path


class ConvertError(ValueError):
    """Weights or a config that cannot be converted: one line naming the file or field, exit 2."""


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConvertError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data

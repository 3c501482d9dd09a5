"""Reading the JSON files a user may have edited (configs, manifests) with errors that say what is wrong."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_object(path: Path, error: type[Exception], advice: str) -> dict[str, Any]:
    """A JSON object from ``path``; binary data, bad JSON or another JSON type raise ``error``
    with what is wrong and ``advice`` (what to do)."""
    try:
        data = json.loads(path.read_bytes())
    except UnicodeDecodeError:
        raise error(f"{path} is not text (binary data): {advice}") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}): {advice}") from None
    if not isinstance(data, dict):
        raise error(f"{path} holds a JSON {type(data).__name__}, not an object: {advice}")
    return data

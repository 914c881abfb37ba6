"""Parsing what imagebuild did not write itself (sidecars, manifests, docker configs,
worker and registry replies) without a traceback: JSON nested deeper than Python's
recursion limit is a ``ValueError`` like any other malformed JSON, so every caller's
``except ValueError`` turns it into its own typed error."""

from __future__ import annotations

import json
from typing import Any


def loads_json(data: str | bytes | bytearray) -> Any:
    """``json.loads``, with nesting too deep to parse raised as ``ValueError``."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None

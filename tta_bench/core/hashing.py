"""Content hashes of JSON-able values: job keys, run keys, checkpoint and cache fingerprints."""
from __future__ import annotations

import hashlib
import json
from typing import Any


def json_sha256(value: Any) -> str:
    """sha256 (hex) of `value` as sorted-key JSON (anything not JSON-native as its str)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()

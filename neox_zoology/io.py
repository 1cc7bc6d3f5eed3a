"""Files written whole or not at all: a reader sees the old content or the new, never a part."""
from __future__ import annotations

import json
import os
from pathlib import Path


def atomic_write_text(path: str | os.PathLike, text: str, *, temp_suffix: str = ".tmp") -> None:
    """Write `text` to `path` through `<path><temp_suffix>` and an atomic rename; creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + temp_suffix)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: str | os.PathLike, doc, *, indent: int = 1, temp_suffix: str = ".tmp") -> None:
    """`doc` as JSON (one trailing newline) to `path`, atomically (see atomic_write_text)."""
    atomic_write_text(path, json.dumps(doc, indent=indent) + "\n", temp_suffix=temp_suffix)

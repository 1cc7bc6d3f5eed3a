"""Files written whole or not at all: a reader sees the old content or the new, never a part.

Every writer here writes a temporary file in the target's own folder (so the rename cannot cross file
systems), flushes it to disk (fsync), renames it onto the target (`os.replace`, atomic on POSIX and
Windows) and then syncs the folder, so that after a crash the name holds the old file or the whole new
one. On an error the temporary file is removed and the target is untouched. Staged sets of files
renamed in an order (a dataset's `.bin` before its `.idx`, a checkpoint's staging folder) are their own
commits; their single files use these writers where they are written whole.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, temp_suffix: str = ".tmp") -> Iterator[Path]:
    """Yield `<path><temp_suffix>` to write (by name or by opening it); on a clean exit it is synced and
    renamed onto `path`, on an error deleted. Creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + temp_suffix)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)  # the writer may have closed its own handle: sync by name
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, temp_suffix: str = ".tmp") -> None:
    """Write `data` to `path` whole or not at all (see atomic_path)."""
    with atomic_path(path, temp_suffix=temp_suffix) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str, *, temp_suffix: str = ".tmp") -> None:
    """Write `text` (UTF-8) to `path` whole or not at all (see atomic_path)."""
    atomic_write_bytes(path, text.encode("utf-8"), temp_suffix=temp_suffix)


def atomic_write_json(path: str | os.PathLike, doc, *, indent: int = 1, temp_suffix: str = ".tmp") -> None:
    """`doc` as JSON (one trailing newline) to `path`, whole or not at all (see atomic_path)."""
    atomic_write_text(path, json.dumps(doc, indent=indent) + "\n", temp_suffix=temp_suffix)

"""Reading preprocessing input: which files `--input` names, and each file as chunks of whole lines.

Plain `.jsonl`/`.json` and zstandard `.jsonl.zst`/`.json.zst` files (multi-frame included) are read in
order. A `.zst` that ends mid-frame or holds undecodable data keeps the lines before the damage and
yields a `Skip` (`truncated_zst` / `corrupt_zst`) for the line it cuts; docs/data.md has the rules.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

SUFFIXES = (".jsonl", ".json", ".jsonl.zst", ".json.zst")
READ_BYTES = 1 << 20  # bytes read from an input file at a time (compressed bytes for .zst)


class PreprocessError(ValueError):
    """Bad arguments or bad input beyond --max-bad-fraction; the message names the fix."""


# --------------------------------------------------------------------------------------- inputs


def expand_inputs(items: Iterable[str | os.PathLike]) -> list[Path]:
    """Files named by ``items``: paths, comma-separated lists, folders and glob patterns."""
    paths: list[Path] = []
    for item in items:
        for part in str(item).split(","):
            if not part:
                continue
            if any(ch in part for ch in "*?["):
                matches = sorted(glob.glob(part))
                if not matches:
                    raise PreprocessError(f"--input pattern {part!r} matches no file: fix the pattern")
                found = [Path(m) for m in matches if _supported(Path(m))]
                if not found:
                    raise PreprocessError(f"--input pattern {part!r} matches no {'/'.join(SUFFIXES)} file")
                paths += found
            elif Path(part).is_dir():
                found = sorted(p for p in Path(part).iterdir() if p.is_file() and _supported(p))
                if not found:
                    raise PreprocessError(f"--input folder {part!r} holds no {'/'.join(SUFFIXES)} file")
                paths += found
            elif not Path(part).is_file():
                raise PreprocessError(f"--input file {part!r} does not exist: fix the path")
            elif not _supported(Path(part)):
                raise PreprocessError(
                    f"--input file {part!r}: unsupported type; give JSON lines as "
                    f"{', '.join(SUFFIXES)} (decompress other formats first)"
                )
            else:
                paths.append(Path(part))
    if not paths:
        raise PreprocessError("--input names no file")
    seen: set[Path] = set()
    for path in paths:
        if path.resolve() in seen:
            raise PreprocessError(f"--input file {str(path)!r} is given twice: its documents would be "
                                  "written twice; name it once")
        seen.add(path.resolve())
    return paths


def _supported(path: Path) -> bool:
    return path.name.endswith(SUFFIXES)


def _is_zst(path: Path) -> bool:
    return path.name.endswith(".zst")


# ----------------------------------------------------------------- reading: chunks of whole lines


@dataclass
class Chunk:
    file: int  # index into the input list
    path: str
    first_line: int  # 1-based line number of the chunk's first line
    data: bytes  # whole lines (the last one may lack its newline at the end of a file)
    position: int  # bytes of the file (compressed bytes for .zst) consumed once this chunk is read


@dataclass
class Skip:
    """A bad line found while reading (a cut or corrupt .zst), not by a worker."""

    file: int
    line: int
    reason: str
    detail: str
    position: int


class _ZstEnd(Exception):
    def __init__(self, reason: str, detail: str, position: int):
        super().__init__(detail)
        self.reason, self.detail, self.position = reason, detail, position


def _blocks(path: Path) -> Iterator[tuple[bytes, int]]:
    """Decompressed pieces of ``path`` with the file position after each; _ZstEnd on a bad .zst."""
    with open(path, "rb") as f:
        if not _is_zst(path):
            while block := f.read(READ_BYTES):
                yield block, f.tell()
            return
        import zstandard

        dctx = zstandard.ZstdDecompressor(max_window_size=1 << 31)  # long-window archives too
        frame, fed = dctx.decompressobj(), False
        while block := f.read(READ_BYTES):
            position = f.tell()
            while block:
                fed = True
                try:
                    out = frame.decompress(block)
                except zstandard.ZstdError as exc:
                    raise _ZstEnd("corrupt_zst", f"undecodable zstd data ({exc}); the rest of the "
                                  "file is skipped", position) from None
                if frame.eof:  # a frame ended; what follows it starts the next frame
                    block, frame, fed = frame.unused_data, dctx.decompressobj(), False
                else:
                    block = b""
                if out:
                    yield out, position
        if fed:
            raise _ZstEnd("truncated_zst", "the file ends in the middle of a zstd frame (an "
                          "interrupted download or copy?); the cut line is skipped", f.tell())


def read_chunks(path: Path, index: int, chunk_bytes: int) -> Iterator[Chunk | Skip]:
    """Chunks of about ``chunk_bytes`` of whole lines, in order; a Skip where a .zst goes bad."""
    line, pending, position = 1, b"", 0
    try:
        for data, position in _blocks(path):
            pending += data
            while len(pending) >= chunk_bytes:
                cut = pending.rfind(b"\n", 0, chunk_bytes)
                if cut < 0:  # one line longer than a chunk: it becomes a chunk of its own
                    cut = pending.find(b"\n", chunk_bytes)
                    if cut < 0:
                        break  # its end is not read yet
                piece, pending = pending[:cut + 1], pending[cut + 1:]
                yield Chunk(index, str(path), line, piece, position)
                line += piece.count(b"\n")
    except _ZstEnd as end:
        cut = pending.rfind(b"\n")
        if cut >= 0:
            yield Chunk(index, str(path), line, pending[:cut + 1], end.position)
            line += pending.count(b"\n", 0, cut + 1)
        partial = pending[cut + 1:]
        detail = end.detail + (f" ({len(partial)} bytes of it were read)" if partial else "")
        yield Skip(index, line, end.reason, detail, end.position)
        return
    if pending:
        yield Chunk(index, str(path), line, pending, position)

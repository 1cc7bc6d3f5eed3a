"""megatron-core's indexed dataset (`PREFIX.bin` tokens + `PREFIX.idx` index): the one reader of its index.

The .idx is: magic `MMIDIDX\\0\\0`, version (u64, 1), dtype code (u8), sequence count n (u64), document
count m (u64), then n int32 lengths, n int64 byte pointers into the .bin, m int64 document boundaries
(sequence indices, 0 ... n). Every problem is an IndexFileError naming the file; callers add the fix.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
HEADER_BYTES = 9 + 8 + 1 + 8 + 8
TOKEN_DTYPES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 8: "uint16"}
"""megatron-core's dtype codes that can hold token ids (6 and 7 are float64/float32)."""


class IndexFileError(ValueError):
    """A .idx/.bin pair that cannot be read as token data; the message names the file."""


@dataclass(frozen=True)
class Index:
    """The header of `prefix.idx`: token dtype, `sequences` (n) and `boundaries` (m = documents + 1)."""

    prefix: str
    dtype: np.dtype
    sequences: int
    boundaries: int

    @property
    def idx(self) -> Path:
        return Path(self.prefix + ".idx")

    @property
    def bin(self) -> Path:
        return Path(self.prefix + ".bin")

    @property
    def expected_bytes(self) -> int:
        """Size of the whole .idx its header implies."""
        return HEADER_BYTES + 12 * self.sequences + 8 * self.boundaries

    def _read(self, offset: int, fmt: str):
        with open(self.idx, "rb") as f:
            f.seek(offset)
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

    def pointer(self, i: int) -> int:
        """Byte offset of sequence i in the .bin; i == sequences gives the .bin's size the index implies."""
        if i < self.sequences:
            return self._read(HEADER_BYTES + 4 * self.sequences + 8 * i, "<q")
        if not self.sequences:
            return 0
        last = self.sequences - 1
        return self.pointer(last) + self._read(HEADER_BYTES + 4 * last, "<i") * self.dtype.itemsize

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lengths, pointers, document boundaries), after checking the file is exactly as long as the header says."""
        raw = self.idx.read_bytes()
        if len(raw) != self.expected_bytes:
            raise IndexFileError(f"{self.idx}: {len(raw)} bytes, but its header ({self.sequences} sequences, "
                                 f"{self.boundaries} document boundaries) needs {self.expected_bytes}: the file is "
                                 "truncated or corrupt")
        n = self.sequences
        return (np.frombuffer(raw, np.int32, n, HEADER_BYTES),
                np.frombuffer(raw, np.int64, n, HEADER_BYTES + 4 * n),
                np.frombuffer(raw, np.int64, self.boundaries, HEADER_BYTES + 12 * n))


def read_index(prefix: str) -> Index:
    """The header of `prefix.idx`, checked: magic, version 1, a dtype that holds token ids."""
    idx = Path(prefix + ".idx")
    with open(idx, "rb") as f:
        header = f.read(HEADER_BYTES)
    if len(header) < HEADER_BYTES or header[:9] != MAGIC:
        raise IndexFileError(f"{idx}: not a megatron index (bad header or {len(header)} bytes)")
    version, code, sequences, boundaries = struct.unpack("<QBQQ", header[9:])
    if version != 1:
        raise IndexFileError(f"{idx}: index version {version}, expected 1")
    if code not in TOKEN_DTYPES:
        raise IndexFileError(f"{idx}: dtype code {code} cannot hold token ids (known: {TOKEN_DTYPES})")
    return Index(prefix, np.dtype(TOKEN_DTYPES[code]), sequences, boundaries)

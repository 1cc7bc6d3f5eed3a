"""Writing preprocessing output: megatron-core's `.bin`/`.idx` from whole arrays of documents, the token
dtype of a vocabulary, and the clean-up of partial files that killed runs left behind.

Every output file is first written under `<name>.partial-<pid>` (`PARTIAL`) and renamed into place by
`tokenization.preprocess` once the whole input is done.
"""

from __future__ import annotations

import glob
import os
import struct
import warnings
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import numpy as np

PARTIAL = ".partial-"


@lru_cache(maxsize=None)
def array_builder_class():
    """IndexedDatasetBuilder that takes whole arrays of documents and scales to the Pile.

    The base class keeps Python lists of every length and pointer and loops over them in finalize
    (several GB and minutes for the Pile's 210M documents); this keeps int32 arrays and writes the
    same .idx bytes with vectorised, blockwise arithmetic (tested byte-equal to the base class).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron-core warns that apex / TransformerEngine are absent
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, _IndexWriter

    class ArrayIndexedDatasetBuilder(IndexedDatasetBuilder):
        BLOCK = 1 << 22

        def __init__(self, bin_path: str, dtype) -> None:
            super().__init__(bin_path, dtype=dtype)
            self._lengths: list[np.ndarray] = []

        def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
            """Append ``len(lengths)`` documents, one sequence each, stored back to back in ``tokens``."""
            tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
            lengths = np.asarray(lengths, dtype=np.int32)
            if int(lengths.sum(dtype=np.int64)) != tokens.size:
                raise ValueError(f"lengths sum to {int(lengths.sum())} but {tokens.size} tokens were given")
            self.data_file.write(tokens.data)
            self._lengths.append(lengths)

        def finalize(self, idx_path: str) -> None:
            if len(self.sequence_lengths) or len(self.document_indices) != 1:
                raise RuntimeError("ArrayIndexedDatasetBuilder: use add_documents only")
            self.data_file.close()
            lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
            count = len(lengths)
            itemsize = np.dtype(self.dtype).itemsize
            with _IndexWriter(idx_path, self.dtype) as writer:  # magic, version, dtype code
                out = writer.idx_writer
                out.write(struct.pack("<Q", count))  # sequences
                out.write(struct.pack("<Q", count + 1))  # document indices: one document per sequence
                out.write(lengths.tobytes())
                start = 0
                for block in range(0, count, self.BLOCK):  # byte offset of each sequence
                    part = lengths[block:block + self.BLOCK].astype(np.int64) * itemsize
                    ends = np.cumsum(part) + start
                    out.write((ends - part).tobytes())
                    start = int(ends[-1])
                for block in range(0, count + 1, self.BLOCK):
                    out.write(np.arange(block, min(count + 1, block + self.BLOCK), dtype=np.int64).tobytes())

    return ArrayIndexedDatasetBuilder


def token_dtype(vocab_size: int) -> np.dtype:
    """The token dtype megatron-core picks for a vocabulary (uint16 below 65500 ids, else int32)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import DType
    return np.dtype(DType.optimal_dtype(vocab_size))


def remove_stale_partials(prefixes: Iterable[str]) -> None:
    """Delete partial files of these prefixes left by runs that no longer exist (killed -9)."""
    for prefix in prefixes:
        folder, name = Path(prefix).parent, Path(prefix).name
        for path in folder.glob(glob.escape(name) + f".*{PARTIAL}*"):
            pid = path.name.rsplit(PARTIAL, 1)[1]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

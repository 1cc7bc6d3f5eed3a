"""Token streams of megatron-core datasets for bigram counting: whole datasets or document ranges.

A dataset's stream is its .bin's tokens in file order, eod included, so pairs across a document
boundary count, as in packed training sequences. A `Documents(prefix, start, stop)` is a stream of its
own: pairs within it count, the pair across its edge never does. `split_documents` gives the documents
of GPT-NeoX's `split`, by megatron-core's rule. Streams are read in chunks through one reused buffer
(no memory map), and every token id is checked against the vocabulary.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neox_zoology.indexed import IndexFileError, read_index

EVAL_CHUNK_TOKENS = 1 << 22


class BigramCountsError(ValueError):
    """A counts file or dataset that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class Documents:
    """Documents [start, stop) of the dataset at ``prefix``: the sequences of its .idx in file order
    (one per document as tokenization.preprocess writes them; megatron-core's ``split`` divides these).
    ``stop`` None is the end of the dataset; ``Documents(prefix)`` is the whole of it."""

    prefix: str
    start: int = 0
    stop: int | None = None

    def __str__(self) -> str:
        return describe(self.prefix, (self.start, self.stop))


def describe(prefix: str, documents: tuple[int, int | None] | None) -> str:
    """``prefix``, with its document range when that is a part of the dataset."""
    if documents is None or documents == (0, None):
        return prefix
    start, stop = documents
    return f"{prefix} documents [{start}, {'end' if stop is None else stop})"


@dataclass(frozen=True)
class DatasetInfo:
    prefix: str
    dtype: np.dtype
    tokens: int  # tokens of the selected documents
    sequences: int  # documents (index sequences) of the whole dataset
    documents: tuple[int, int] | None = None  # the selected documents [start, stop); None: all
    first_token: int = 0  # where the selected documents start in the .bin, in tokens

    @property
    def name(self) -> str:
        return describe(self.prefix, self.documents)

    @property
    def document_range(self) -> tuple[int, int]:
        return self.documents if self.documents is not None else (0, self.sequences)


def dataset_info(prefix: str | Documents, documents: tuple[int, int | None] | None = None) -> DatasetInfo:
    """Token dtype and counts of a megatron-core .bin/.idx pair, checked against each other; with
    ``documents`` (start, stop), or a Documents, those of documents [start, stop) only.

    Only the header and a few lengths and offsets of the .idx are read, so this is instant however
    large the dataset.
    """
    if isinstance(prefix, Documents):
        prefix, documents = prefix.prefix, (prefix.start, prefix.stop)
    for path in (Path(prefix + ".idx"), Path(prefix + ".bin")):
        if not path.is_file():
            raise BigramCountsError(f"{path} not found: give the dataset prefix (the path without "
                                    ".bin/.idx), as in train_data_paths")
    try:
        index = read_index(prefix)
    except IndexFileError as exc:
        raise BigramCountsError(f"{exc}; make the dataset again with python -m tokenization.preprocess") from None
    dtype, sequences, size = index.dtype, index.sequences, index.bin.stat().st_size
    expected = index.pointer(sequences)
    if expected != size:
        raise BigramCountsError(f"{index.bin} has {size} bytes but its .idx describes {expected}: the pair "
                                "does not belong together (an interrupted copy?); make it again")
    if documents is None:
        return DatasetInfo(prefix, dtype, size // dtype.itemsize, sequences)
    start, stop = int(documents[0]), sequences if documents[1] is None else int(documents[1])
    if not 0 <= start <= stop <= sequences:
        raise BigramCountsError(f"{prefix}: documents [{start}, {stop}) are not within its {sequences} "
                                "documents")
    first, end = index.pointer(start), index.pointer(stop)
    return DatasetInfo(prefix, dtype, (end - first) // dtype.itemsize, sequences, (start, stop),
                       first // dtype.itemsize)


def split_documents(prefix: str, split: str) -> list[Documents | None]:
    """The train, validation and test documents of ``prefix`` under GPT-NeoX's ``split``.

    ``split`` is the config value (``"980,20,0"``; up to three non-negative proportions, missing ones
    0). megatron-core's rule (BlendedMegatronDatasetBuilder with one ``data_path``, GPTDataset: the
    index's sequences): with the proportions normalized and accumulated into [a_i, b_i), part i is
    documents [round(a_i * n), round(b_i * n)) of the n; a part with no share is None.
    """
    try:
        values = [float(v) for v in re.findall(r"[.0-9]+", str(split))]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 3 or sum(values) <= 0:
        raise BigramCountsError(f"split {split!r}: give up to three proportions 'train,valid,test' with a "
                                "positive sum, as in the config (e.g. '980,20,0')")
    values += [0.0] * (3 - len(values))
    weights = np.array(values, dtype=np.float64)
    weights = (weights / np.sum(weights)).tolist()  # computed as megatron-core does: equal float bounds
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + w)
    n = dataset_info(prefix).sequences
    parts: list[Documents | None] = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        parts.append(None if hi <= lo else Documents(prefix, int(round(lo * float(n))), int(round(hi * float(n)))))
    return parts


def info_of(part: str | Documents) -> DatasetInfo:
    return dataset_info(part) if isinstance(part, Documents) else dataset_info(str(part))


def token_chunks(info: DatasetInfo, chunk_tokens: int, limit: int | None = None
                 ) -> Iterator[np.ndarray]:
    """The first ``limit`` tokens of a dataset (of its selected documents) in chunks; each chunk starts
    with the previous chunk's last token, so adjacent pairs within the chunks are exactly the stream's pairs.

    The chunks share one buffer: use a chunk before asking for the next.
    """
    total = info.tokens if limit is None else min(info.tokens, limit)
    buffer = np.empty(min(chunk_tokens, total) + 1, info.dtype)
    done, start = 0, 0
    with open(info.prefix + ".bin", "rb", buffering=0) as f:
        f.seek(info.first_token * info.dtype.itemsize)
        while done < total:
            n = min(chunk_tokens, total - done)
            view = memoryview(buffer[start:start + n]).cast("B")
            got = 0
            while got < len(view):
                read = f.readinto(view[got:])
                if not read:
                    raise BigramCountsError(f"{info.prefix}.bin ended early, at token {info.first_token + done}")
                got += read
            yield buffer[:start + n]
            buffer[0] = buffer[start + n - 1]
            done, start = done + n, 1


def pair_keys(chunk: np.ndarray, vocab_size: int, info: DatasetInfo, offset: int) -> np.ndarray:
    """a * V + b for each adjacent pair of ``chunk``, after checking every id is below V.

    ``offset`` is the chunk's first token within the selected tokens (for messages)."""
    if chunk.size and (int(chunk.max()) >= vocab_size or int(chunk.min()) < 0):
        bad = int(np.flatnonzero((chunk >= vocab_size) | (chunk < 0))[0])
        raise BigramCountsError(
            f"{info.prefix}.bin: token {int(chunk[bad])} near token {info.first_token + offset + bad} is not "
            f"below vocab_size {vocab_size}: the dataset was made with another tokenizer; give the "
            "tokenizer that made it"
        )
    keys = chunk[:-1].astype(np.int64)
    keys *= vocab_size
    keys += chunk[1:]
    return keys


def eval_bigrams(infos: Sequence[DatasetInfo], vocab_size: int, max_tokens: int | None = None,
                 chunk_tokens: int = EVAL_CHUNK_TOKENS) -> tuple[np.ndarray, np.ndarray, int]:
    """Sorted distinct bigram keys of the datasets, their counts, and the tokens read."""
    keys, counts, read = np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    for info in infos:
        budget = None if max_tokens is None else max_tokens - read
        if budget is not None and budget <= 0:
            break
        offset = 0
        for chunk in token_chunks(info, chunk_tokens, budget):
            new, new_counts = np.unique(pair_keys(chunk, vocab_size, info, offset), return_counts=True)
            keys, counts = merge_counts(keys, counts, new, new_counts)
            offset += chunk.size - (offset > 0)
        read += offset
    return keys, counts, read


def merge_counts(keys_a, counts_a, keys_b, counts_b):
    keys = np.concatenate([keys_a, keys_b])
    counts = np.concatenate([counts_a, counts_b.astype(np.int64)])
    order = np.argsort(keys, kind="stable")  # two sorted runs: a linear merge
    keys, counts = keys[order], counts[order]
    if keys.size == 0:
        return keys, counts
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    return keys[starts], np.add.reduceat(counts, starts)

"""How often each bigram of the evaluation data occurred in the training data.

    python -m tokenization.bigrams --train-prefix P --eval-prefix Q --out counts.npz \
        [--split S] [--max-train-tokens N] [--max-eval-tokens N] \
        [--tokenizer-type T --vocab-file V [--merge-file M]]

``P`` and ``Q`` are dataset prefixes (``P.bin`` / ``P.idx``, as in ``train_data_paths``); several
may be given, comma-separated. A bigram is a pair of adjacent tokens of a dataset's token stream as
stored in its .bin, eod tokens included, so pairs that span a document boundary count too, as they
do in packed training sequences. Each prefix is its own stream.

``--split S`` is GPT-NeoX's ``split`` (``"980,20,0"``: train, validation, test proportions) for a
config that trains on one ``data_path``: the training tokens are then only the training documents of
each ``P`` and the evaluation bigrams come from the validation documents of each ``Q`` (default: the
same prefixes). The documents are megatron-core's: part i of the n documents (the index's sequences)
is [round(a_i * n), round(b_i * n)) with [a_i, b_i) the cumulative normalized proportions
(``split_documents``). A selection of documents is one stream of its own: pairs within it count
(across its document boundaries, as above); the pair across its edge, into documents of another
part, never does. In Python, a ``Documents(prefix, start, stop)`` may stand wherever a prefix does.

The evaluation bigrams are collected first (distinct pairs and their own counts, merged chunk by
chunk). The training .bin files are then read in chunks into one reused buffer (no memory map, so
resident memory does not grow with the file) and every training pair is looked up in a hash table
of the evaluation pairs: memory is bounded by the number of distinct evaluation bigrams, not by the
training size. ``--max-train-tokens N`` counts only the first N training tokens (over the prefixes
in order), i.e. a budget of tokens like the one a model saw in training. Training samples are drawn
from shuffled documents, so these are not the very tokens of the first N/seq_length steps; for data
that is itself in random document order (the Pile's shards are), they are a sample of the same
distribution and of the same size, which is what a frequency threshold needs.

The tokenizer identity (type, vocab size, eod, sha256 of its files) comes from the ``P.json`` and
``Q.json`` records that tokenization.preprocess writes beside each dataset; training and evaluation
data made with different tokenizers are refused. For datasets made elsewhere, name the tokenizer with
``--tokenizer-type/--vocab-file/--merge-file``.

Counts file (numpy ``.npz`` holding only arrays, read with ``allow_pickle=False``):

    format            str        "neox_zoology.bigram_counts/1"
    keys              int64 [K]  the K distinct bigrams (a, b) of the evaluation data, as
                                 a * vocab_size + b, sorted ascending
    counts            int64 [K]  how often each occurred in the training tokens counted
    eval_counts       int64 [K]  how often each occurred in the evaluation tokens
    vocab_size        int64 []   V of the keys: the tokenizer's vocab_size, not a padded embedding size
    tokenizer         str   []   JSON: {"type", "vocab_size", "eod", "files": {name: "sha256:<hex>"}}
    tokenizer_id      str   []   "<type>:<16 hex digits>", a short name of that identity for messages
    train_tokens      int64 []   training tokens counted (<= max_train_tokens)
    train_available   int64 []   training tokens in the training data (its selected documents)
    max_train_tokens  int64 []   the --max-train-tokens budget, -1 for none
    eval_tokens       int64 []   evaluation tokens read
    train_prefixes    str   [n]  the training dataset prefixes, in counting order
    eval_prefixes     str   [m]  the evaluation dataset prefixes
    train_documents   int64 [n, 2]  [start, stop) of the documents counted of each training prefix
    eval_documents    int64 [m, 2]  the same for the evaluation prefixes

The two ``*_documents`` fields were added later: a file without them counted whole datasets.

Reading it: ``counts = load_bigram_counts(path, expected_vocab_size=V, expected_tokenizer=tok)``
checks the format, the vocabulary and the tokenizer (a Tokenizer from build_tokenizer, an identity
dict or a tokenizer_id string) and raises BigramCountsError naming what differs; ``lookup(counts, a, b)`` returns
the training counts of the pairs (a[i], b[i]) as an int64 array (numpy broadcasting applies), and
``lookup_keys(counts, keys)`` the counts of keys a * V + b together with which of them the file holds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neox_zoology.indexed import IndexFileError, read_index
from neox_zoology.tokenizer import as_identity, dataset_tokenizer, identity_id, same_tokenizer

FORMAT = "neox_zoology.bigram_counts/1"
CHUNK_TOKENS = 1 << 20  # training tokens per step (2^15..2^20 measured within 5%; ~50 MB of temporaries)
EVAL_CHUNK_TOKENS = 1 << 22
_FIBONACCI = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: multiplicative hashing


class BigramCountsError(ValueError):
    """A counts file or dataset that cannot be used; the message names the file and the fix."""


# ------------------------------------------------------------------------------ reading datasets


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


def _info(part: str | Documents) -> DatasetInfo:
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


def _pair_keys(chunk: np.ndarray, vocab_size: int, info: DatasetInfo, offset: int) -> np.ndarray:
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
            new, new_counts = np.unique(_pair_keys(chunk, vocab_size, info, offset), return_counts=True)
            keys, counts = _merge_counts(keys, counts, new, new_counts)
            offset += chunk.size - (offset > 0)
        read += offset
    return keys, counts, read


def _merge_counts(keys_a, counts_a, keys_b, counts_b):
    keys = np.concatenate([keys_a, keys_b])
    counts = np.concatenate([counts_a, counts_b.astype(np.int64)])
    order = np.argsort(keys, kind="stable")  # two sorted runs: a linear merge
    keys, counts = keys[order], counts[order]
    if keys.size == 0:
        return keys, counts
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    return keys[starts], np.add.reduceat(counts, starts)


# ----------------------------------------------------------------------------- counting training


class BigramCounter:
    """Counts occurrences of a fixed set of bigram keys in streams of token pairs.

    An open-addressing table without probing: each key goes to the slot its multiplicative hash
    names; when several keys share a slot, the one most frequent in the evaluation data (``priority``)
    keeps it and the others go to a small sorted overflow list, and the slot is flagged. A query is
    one gather from the table; only queries that miss on a flagged slot search the overflow list.
    Table entries are ``key << 1 | flag``; counts per slot are uint32, folded into int64 before
    they could overflow. Memory: about 75 bytes per key (72 MiB for a million).
    """

    FOLD_AT = int(np.iinfo(np.uint32).max)  # pairs after which uint32 slot counts are folded

    def __init__(self, keys: np.ndarray, vocab_size: int, priority: np.ndarray | None = None,
                 extra_bits: int = 2):
        keys = np.asarray(keys, np.int64)
        if keys.size and (np.any(keys[1:] <= keys[:-1]) or keys[0] < 0):
            raise ValueError("BigramCounter: keys must be sorted, distinct and non-negative")
        self.keys, self.vocab_size = keys, int(vocab_size)
        bits = max(4, math.ceil(math.log2(max(keys.size, 1))) + extra_bits)
        self._shift = np.uint64(64 - bits)
        size = 1 << bits
        order = (np.arange(keys.size) if priority is None
                 else np.argsort(-np.asarray(priority, np.int64), kind="stable"))
        slots, first = np.unique(self._slots(keys[order]), return_index=True)
        self._winners, self._winner_slots = order[first], slots  # key indices and their slots
        self._table = np.full(size, -2, np.int64)  # -2 >> 1 == -1 matches no key
        self._table[slots] = keys[self._winners] << 1
        lost = np.ones(keys.size, bool)
        lost[self._winners] = False
        self._overflow = np.flatnonzero(lost)  # key indices, ascending, so their keys are sorted
        self._overflow_keys = keys[self._overflow]
        self._table[self._slots(self._overflow_keys)] |= 1
        self._slot_counts = np.zeros(size, np.uint32)
        self._slot_totals: np.ndarray | None = None  # int64, once uint32 could overflow
        self._pending = 0  # pairs counted into _slot_counts since the last fold
        self._overflow_counts = np.zeros(self._overflow.size, np.int64)
        self.pairs = 0

    def _slots(self, keys: np.ndarray) -> np.ndarray:
        hashed = keys.view(np.uint64) * _FIBONACCI  # wraps modulo 2^64, as intended
        hashed >>= self._shift
        return hashed.view(np.int64)

    def update(self, keys: np.ndarray) -> None:
        """Count the pair keys ``keys`` (int64, a * V + b)."""
        if self._pending + keys.size >= self.FOLD_AT:
            self._fold()
        self._pending += keys.size
        self.pairs += keys.size
        slots = self._slots(keys)
        entries = self._table[slots]
        overflowed = entries & 1
        entries >>= 1
        hit = entries == keys
        np.add.at(self._slot_counts, slots[hit], np.uint32(1))
        rest = overflowed > hit  # flagged slot, and not the key living there
        if self._overflow.size and rest.any():
            queries = keys[rest]
            pos = np.minimum(np.searchsorted(self._overflow_keys, queries), self._overflow.size - 1)
            found = self._overflow_keys[pos] == queries
            np.add.at(self._overflow_counts, pos[found], 1)

    def _fold(self) -> None:
        if self._slot_totals is None:
            self._slot_totals = np.zeros(self._slot_counts.size, np.int64)
        self._slot_totals += self._slot_counts
        self._slot_counts[:] = 0
        self._pending = 0

    def counts(self) -> np.ndarray:
        """int64 counts aligned with ``keys``."""
        per_slot = self._slot_counts[self._winner_slots].astype(np.int64)
        if self._slot_totals is not None:
            per_slot += self._slot_totals[self._winner_slots]
        out = np.zeros(self.keys.size, np.int64)
        out[self._winners] = per_slot
        out[self._overflow] = self._overflow_counts
        return out

    @property
    def nbytes(self) -> int:
        arrays = (self.keys, self._winners, self._winner_slots, self._table, self._overflow,
                  self._overflow_keys, self._slot_counts, self._overflow_counts)
        return sum(a.nbytes for a in arrays) + (self._slot_totals.nbytes if self._slot_totals is not None else 0)


# ------------------------------------------------------------------------------- counts files


@dataclass
class BigramCounts:
    """A loaded counts file; see the module docstring for the fields."""

    keys: np.ndarray
    counts: np.ndarray
    eval_counts: np.ndarray
    vocab_size: int
    tokenizer: dict
    tokenizer_id: str
    train_tokens: int
    train_available: int
    max_train_tokens: int | None
    eval_tokens: int
    train_prefixes: list[str]
    eval_prefixes: list[str]
    train_documents: list[tuple[int, int]] | None = None  # per prefix; None: whole datasets
    eval_documents: list[tuple[int, int]] | None = None
    path: str | None = None

    def lookup(self, a, b, missing: int | None = None) -> np.ndarray:
        return lookup(self, a, b, missing)

    @property
    def train_parts(self) -> list[Documents]:
        """What was counted as training data: each prefix with its documents."""
        return _parts(self.train_prefixes, self.train_documents)

    @property
    def eval_parts(self) -> list[Documents]:
        """Where the bigrams (the keys) come from: each evaluation prefix with its documents."""
        return _parts(self.eval_prefixes, self.eval_documents)

    @classmethod
    def from_arrays(cls, keys, counts, vocab_size: int, tokenizer: dict | None = None) -> BigramCounts:
        """Counts made by other means (tests, synthetic benchmarks): distinct keys a * vocab_size + b in
        any order and their training counts. Without ``tokenizer`` (an identity dict) the identity names
        no files, so a check against a real tokenizer refuses it."""
        keys, counts = np.asarray(keys, np.int64).ravel(), np.asarray(counts, np.int64).ravel()
        if keys.shape != counts.shape:
            raise BigramCountsError(f"from_arrays: {keys.size} keys but {counts.size} counts")
        order = np.argsort(keys, kind="stable")
        keys, counts = keys[order], counts[order]
        if keys.size and (np.any(keys[1:] == keys[:-1]) or keys[0] < 0 or keys[-1] >= vocab_size ** 2):
            raise BigramCountsError(f"from_arrays: keys must be distinct bigrams a * {vocab_size} + b of a "
                                    f"{vocab_size}-token vocabulary")
        identity = tokenizer or {"type": "unspecified", "vocab_size": int(vocab_size), "eod": -1, "files": {}}
        return cls(keys=keys, counts=counts, eval_counts=np.zeros(keys.size, np.int64), vocab_size=int(vocab_size),
                   tokenizer=identity, tokenizer_id=identity_id(identity), train_tokens=0, train_available=0,
                   max_train_tokens=None, eval_tokens=0, train_prefixes=[], eval_prefixes=[],
                   train_documents=[], eval_documents=[])


def _parts(prefixes: list[str], documents: list[tuple[int, int]] | None) -> list[Documents]:
    if documents is None:
        return [Documents(p) for p in prefixes]
    return [Documents(p, int(a), int(b)) for p, (a, b) in zip(prefixes, documents)]


def save_bigram_counts(path: str | os.PathLike, counts: BigramCounts) -> None:
    """Write ``counts`` to ``path`` (complete or not at all: written aside, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    try:
        with open(partial, "wb") as f:  # a file object: np.savez adds no .npz to the name
            np.savez(
                f,
                format=np.str_(FORMAT),
                keys=counts.keys.astype(np.int64),
                counts=counts.counts.astype(np.int64),
                eval_counts=counts.eval_counts.astype(np.int64),
                vocab_size=np.int64(counts.vocab_size),
                tokenizer=np.str_(json.dumps(counts.tokenizer, sort_keys=True)),
                tokenizer_id=np.str_(counts.tokenizer_id),
                train_tokens=np.int64(counts.train_tokens),
                train_available=np.int64(counts.train_available),
                max_train_tokens=np.int64(-1 if counts.max_train_tokens is None else counts.max_train_tokens),
                eval_tokens=np.int64(counts.eval_tokens),
                train_prefixes=np.array(counts.train_prefixes, dtype=np.str_),
                eval_prefixes=np.array(counts.eval_prefixes, dtype=np.str_),
                **{name: np.array(ranges, dtype=np.int64).reshape(-1, 2)
                   for name, ranges in (("train_documents", counts.train_documents),
                                        ("eval_documents", counts.eval_documents)) if ranges is not None},
            )
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


_FIELDS = ("format", "keys", "counts", "eval_counts", "vocab_size", "tokenizer", "tokenizer_id",
           "train_tokens", "train_available", "max_train_tokens", "eval_tokens", "train_prefixes",
           "eval_prefixes")
_OPTIONAL_FIELDS = ("train_documents", "eval_documents")  # absent in files that counted whole datasets
_RECOUNT = "count again with python -m tokenization.bigrams"


def load_bigram_counts(path: str | os.PathLike, expected_vocab_size: int | None = None,
                       expected_tokenizer=None) -> BigramCounts:
    """Read a counts file and check it fits the evaluation at hand.

    ``expected_vocab_size`` is the tokenizer's vocab_size (not the padded embedding size);
    ``expected_tokenizer`` a Tokenizer (neox_zoology.tokenizer.build_tokenizer; its files are hashed),
    an identity dict (neox_zoology.tokenizer.tokenizer_identity) or a ``tokenizer_id`` string.
    Raises BigramCountsError naming the file, what differs and how to fix it.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            fields = {name: data[name] for name in data.files}
    except FileNotFoundError:
        raise BigramCountsError(f"bigram counts file {path} not found; {_RECOUNT}") from None
    except (OSError, ValueError) as exc:
        raise BigramCountsError(f"{path} is not a bigram counts file ({exc}); {_RECOUNT}") from None
    missing = [name for name in _FIELDS if name not in fields]
    if missing:
        raise BigramCountsError(f"{path} lacks {', '.join(missing)}: not a {FORMAT} file; {_RECOUNT}")
    if str(fields["format"]) != FORMAT:
        raise BigramCountsError(f"{path} has format {str(fields['format'])!r}, this code reads {FORMAT!r}; "
                                f"{_RECOUNT}")
    keys, counts, eval_counts = fields["keys"], fields["counts"], fields["eval_counts"]
    vocab_size = int(fields["vocab_size"])
    if not (keys.dtype == counts.dtype == eval_counts.dtype == np.int64
            and keys.ndim == 1 and keys.shape == counts.shape == eval_counts.shape):
        raise BigramCountsError(f"{path}: keys, counts and eval_counts must be int64 arrays of one length; "
                                f"{_RECOUNT}")
    if keys.size and (np.any(keys[1:] <= keys[:-1]) or keys[0] < 0 or keys[-1] >= vocab_size ** 2):
        raise BigramCountsError(f"{path}: keys are not sorted distinct bigrams of a {vocab_size}-token "
                                f"vocabulary; {_RECOUNT}")
    tokenizer = json.loads(str(fields["tokenizer"]))
    documents = {}
    for name, prefixes in (("train_documents", "train_prefixes"), ("eval_documents", "eval_prefixes")):
        if name not in fields:
            documents[name] = None
            continue
        ranges = fields[name]
        if not (ranges.dtype == np.int64 and ranges.shape == (fields[prefixes].size, 2)
                and np.all(ranges[:, 0] >= 0) and np.all(ranges[:, 0] <= ranges[:, 1])):
            raise BigramCountsError(f"{path}: {name} must be one [start, stop) int64 pair per entry of {prefixes}; "
                                    f"{_RECOUNT}")
        documents[name] = [(int(a), int(b)) for a, b in ranges]
    result = BigramCounts(
        keys=keys, counts=counts, eval_counts=eval_counts, vocab_size=vocab_size, tokenizer=tokenizer,
        tokenizer_id=str(fields["tokenizer_id"]), train_tokens=int(fields["train_tokens"]),
        train_available=int(fields["train_available"]),
        max_train_tokens=None if int(fields["max_train_tokens"]) < 0 else int(fields["max_train_tokens"]),
        eval_tokens=int(fields["eval_tokens"]), train_prefixes=[str(p) for p in fields["train_prefixes"]],
        eval_prefixes=[str(p) for p in fields["eval_prefixes"]], path=str(path), **documents,
    )
    if expected_vocab_size is not None and int(expected_vocab_size) != vocab_size:
        raise BigramCountsError(
            f"{path} counts bigrams of a {vocab_size}-token vocabulary ({result.tokenizer_id}) but "
            f"vocab_size {expected_vocab_size} was expected; pass the tokenizer's vocab_size (not the "
            f"padded embedding size), or {_RECOUNT} on data made with this tokenizer"
        )
    if isinstance(expected_tokenizer, str):
        if expected_tokenizer != result.tokenizer_id:
            raise BigramCountsError(
                f"{path} was counted on data tokenized by {result.tokenizer_id} but the evaluation "
                f"expects {expected_tokenizer!r}; {_RECOUNT} on data made with the evaluation's tokenizer "
                "(or pass the Tokenizer itself, whose files are then hashed and compared)"
            )
    elif expected_tokenizer is not None:
        expected = as_identity(expected_tokenizer)
        if not same_tokenizer(tokenizer, expected):
            raise BigramCountsError(
                f"{path} was counted on data tokenized by {result.tokenizer_id} "
                f"(files {tokenizer['files']}) but the evaluation uses {identity_id(expected)} "
                f"(files {expected['files']}); {_RECOUNT} on data made with the evaluation's tokenizer"
            )
    return result


def lookup_keys(counts: BigramCounts, keys) -> tuple[np.ndarray, np.ndarray]:
    """Training counts of the bigram keys a * vocab_size + b (0 for keys the file does not hold) and a
    mask of the keys it holds; both shaped like ``keys``."""
    keys = np.asarray(keys, np.int64)
    if counts.keys.size == 0:
        return np.zeros(keys.shape, np.int64), np.zeros(keys.shape, bool)
    pos = np.minimum(np.searchsorted(counts.keys, keys), counts.keys.size - 1)
    found = counts.keys[pos] == keys
    return np.where(found, counts.counts[pos], 0).astype(np.int64), found


def lookup(counts: BigramCounts, a, b, missing: int | None = None) -> np.ndarray:
    """Training counts of the bigrams (a[i], b[i]) (arrays broadcast), as int64.

    Every pair must be one of the file's evaluation bigrams, else BigramCountsError, unless
    ``missing`` gives the value to return for such pairs.
    """
    a, b = np.broadcast_arrays(np.asarray(a), np.asarray(b))
    if a.size == 0:
        return np.zeros(a.shape, np.int64)
    for name, ids in (("a", a), ("b", b)):
        if not np.issubdtype(ids.dtype, np.integer):
            raise BigramCountsError(f"lookup: {name} must hold integer token ids, not {ids.dtype}")
        if ids.min() < 0 or ids.max() >= counts.vocab_size:
            bad = ids[(ids < 0) | (ids >= counts.vocab_size)].flat[0]
            raise BigramCountsError(f"lookup: token id {int(bad)} in {name} is outside the vocabulary "
                                    f"[0, {counts.vocab_size}) of {counts.path or 'the counts'}")
    found_counts, found = lookup_keys(counts, a.astype(np.int64) * counts.vocab_size + b)
    if missing is None and not found.all():
        first = np.flatnonzero(~found.ravel())[0]
        raise BigramCountsError(
            f"{int((~found).sum())} of {found.size} bigrams are not in {counts.path or 'the counts'} "
            f"(first: ({int(a.flat[first])}, {int(b.flat[first])})): it holds the bigrams of "
            f"{', '.join(map(str, counts.eval_parts))} only; count with the evaluation data you evaluate on, "
            "or pass missing=<value>"
        )
    return np.where(found, found_counts, 0 if missing is None else missing).astype(np.int64)


# ------------------------------------------------------------------------------------ counting


def resolve_tokenizer(prefixes: Sequence[str], given: dict | None = None) -> dict:
    """The one tokenizer identity of all ``prefixes``: from their records, checked against ``given``."""
    try:
        records = {prefix: dataset_tokenizer(prefix) for prefix in prefixes}
    except ValueError as exc:
        raise BigramCountsError(str(exc)) from None
    reference_name, reference = ("the given tokenizer", given) if given else next(
        ((p, r) for p, r in records.items() if r is not None), (None, None))
    if reference is None:
        raise BigramCountsError(
            f"no tokenizer record {prefixes[0]}.json (tokenization.preprocess writes one beside each "
            "dataset): name the tokenizer that made the data with --tokenizer-type, --vocab-file and "
            "--merge-file"
        )
    for prefix, record in records.items():
        if record is not None and not same_tokenizer(record, reference):
            raise BigramCountsError(
                f"{prefix} was tokenized by {identity_id(record)} but {reference_name} is "
                f"{identity_id(reference)} (files {record['files']} vs {reference['files']}): "
                "bigram ids of different tokenizers do not match; tokenize both with the same one"
            )
    return reference


def count_bigrams(train: Sequence[str | Documents], evaluation: Sequence[str | Documents], *,
                  tokenizer: dict | None = None, max_train_tokens: int | None = None,
                  max_eval_tokens: int | None = None, chunk_tokens: int = CHUNK_TOKENS,
                  progress: bool = False) -> BigramCounts:
    """Count, over the training datasets, the bigrams of the evaluation datasets.

    Each dataset is a prefix (all of its documents) or a Documents (those documents only, e.g. a
    part from ``split_documents``). ``tokenizer`` is an identity dict
    (neox_zoology.tokenizer.tokenizer_identity) for datasets without a record; with records it must
    agree with them.
    """
    train, evaluation = list(train), list(evaluation)
    if not train or not evaluation:
        raise BigramCountsError("give at least one training and one evaluation dataset prefix")
    for name, value in (("max_train_tokens", max_train_tokens), ("max_eval_tokens", max_eval_tokens)):
        if value is not None and value < 2:
            raise BigramCountsError(f"{name} {value}: give at least 2 tokens (one bigram)")
    train_infos = [_info(p) for p in train]
    eval_infos = [_info(p) for p in evaluation]
    identity = resolve_tokenizer([info.prefix for info in train_infos + eval_infos], tokenizer)
    vocab_size = int(identity["vocab_size"])

    keys, eval_counts, eval_tokens = eval_bigrams(eval_infos, vocab_size, max_eval_tokens)
    counter = BigramCounter(keys, vocab_size, priority=eval_counts)
    available = sum(info.tokens for info in train_infos)
    target = available if max_train_tokens is None else min(available, max_train_tokens)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=target, unit="tok", unit_scale=True, desc="bigrams", file=sys.stderr)
    read = 0
    try:
        for info in train_infos:
            if read >= target:
                break
            offset = 0
            for chunk in token_chunks(info, chunk_tokens, target - read):
                counter.update(_pair_keys(chunk, vocab_size, info, offset))
                new = chunk.size - (offset > 0)
                offset += new
                if bar is not None:
                    bar.update(new)
            read += offset
    finally:
        if bar is not None:
            bar.close()
    return BigramCounts(
        keys=keys, counts=counter.counts(), eval_counts=eval_counts, vocab_size=vocab_size,
        tokenizer=identity, tokenizer_id=identity_id(identity), train_tokens=read,
        train_available=available, max_train_tokens=max_train_tokens, eval_tokens=eval_tokens,
        train_prefixes=[info.prefix for info in train_infos], eval_prefixes=[info.prefix for info in eval_infos],
        train_documents=[info.document_range for info in train_infos],
        eval_documents=[info.document_range for info in eval_infos],
    )


def _split_part(prefix: str, split: str, index: int) -> Documents:
    part = split_documents(prefix, split)[index]
    if part is None:
        name = ("training", "validation")[index]
        raise BigramCountsError(f"split {split!r} gives {prefix} no {name} documents; give that part a share")
    return part


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tokenization.bigrams",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="The counts file format is in the module docstring.")
    parser.add_argument("--train-prefix", required=True,
                        help="training dataset prefix(es), comma-separated (PREFIX.bin/.idx)")
    parser.add_argument("--eval-prefix", default=None,
                        help="evaluation dataset prefix(es) (with --split, default: the --train-prefix ones)")
    parser.add_argument("--split", default=None, metavar="S",
                        help="the config's split, e.g. 980,20,0: count the training documents of each "
                             "--train-prefix, take the bigrams of the validation documents of each --eval-prefix "
                             "(megatron-core's document split, as training with data_path uses it)")
    parser.add_argument("--out", required=True, help="counts file to write (.npz)")
    parser.add_argument("--max-train-tokens", type=int, default=None,
                        help="count only the first N training tokens (default: all)")
    parser.add_argument("--max-eval-tokens", type=int, default=None,
                        help="take bigrams from the first N evaluation tokens only (default: all)")
    parser.add_argument("--tokenizer-type", help="for datasets without a tokenization.preprocess record")
    parser.add_argument("--vocab-file")
    parser.add_argument("--merge-file")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        if Path(args.out).is_dir():
            raise BigramCountsError(f"--out {args.out} is a folder; give the counts file to write, e.g. "
                                    f"{Path(args.out) / 'bigrams.npz'}")
        given = None
        if args.tokenizer_type:
            from neox_zoology.tokenizer import build_tokenizer, tokenizer_identity

            given = tokenizer_identity(build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file))
        train = [p for p in args.train_prefix.split(",") if p]
        if args.eval_prefix is None and args.split is None:
            raise BigramCountsError("give --eval-prefix (or --split, to evaluate on the validation documents "
                                    "of the --train-prefix datasets)")
        evaluation = train if args.eval_prefix is None else [p for p in args.eval_prefix.split(",") if p]
        if args.split is not None:
            train = [_split_part(p, args.split, 0) for p in train]
            evaluation = [_split_part(p, args.split, 1) for p in evaluation]
        counts = count_bigrams(
            train, evaluation,
            tokenizer=given, max_train_tokens=args.max_train_tokens, max_eval_tokens=args.max_eval_tokens,
            progress=not args.no_progress,
        )
        save_bigram_counts(args.out, counts)
    except (BigramCountsError, ValueError) as exc:
        sys.exit(f"bigrams: error: {exc}")
    except OSError as exc:
        sys.exit(f"bigrams: error: cannot write {args.out}: {exc.strerror or exc}")
    seconds = time.perf_counter() - start
    seen = int((counts.counts > 0).sum())
    print(f"{counts.keys.size:,} distinct evaluation bigrams from {counts.eval_tokens:,} tokens "
          f"({', '.join(map(str, counts.eval_parts))}); "
          f"{seen:,} of them occur in the {counts.train_tokens:,} training tokens counted "
          f"(of {counts.train_available:,} in {', '.join(map(str, counts.train_parts))}); {seconds:.1f} s "
          f"({counts.train_tokens / seconds:,.0f} training tokens/s) -> {args.out} [{counts.tokenizer_id}]")


if __name__ == "__main__":
    main()

"""The bigram counts file (`neox_zoology.bigram_counts/1`, a numpy `.npz` of arrays only): writing it,
reading it with its checks, and looking pairs up.

`keys` are the distinct evaluation bigrams (a, b) as a * vocab_size + b, sorted; `counts` their
occurrences in the training tokens counted; the other fields say what was counted (docs/data.md has
every field). `save_bigram_counts` writes the file whole or not at all. `load_bigram_counts` checks the
format, the vocabulary and the tokenizer against the evaluation's and raises BigramCountsError naming
what differs; `lookup(counts, a, b)` gives the training counts of pairs (numpy broadcasting applies),
`lookup_keys(counts, keys)` those of keys together with which of them the file holds.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from neox_zoology.io import atomic_path
from neox_zoology.tokenizer import as_identity, identity_id, same_tokenizer
from tokenization.bigrams_data import BigramCountsError, Documents

FORMAT = "neox_zoology.bigram_counts/1"


@dataclass
class BigramCounts:
    """A loaded counts file; docs/data.md has the fields."""

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
        return _documents_of(self.train_prefixes, self.train_documents)

    @property
    def eval_parts(self) -> list[Documents]:
        """Where the bigrams (the keys) come from: each evaluation prefix with its documents."""
        return _documents_of(self.eval_prefixes, self.eval_documents)

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


def _documents_of(prefixes: list[str], documents: list[tuple[int, int]] | None) -> list[Documents]:
    if documents is None:
        return [Documents(p) for p in prefixes]
    return [Documents(p, int(a), int(b)) for p, (a, b) in zip(prefixes, documents)]


def save_bigram_counts(path: str | os.PathLike, counts: BigramCounts) -> None:
    """Write ``counts`` to ``path``, whole or not at all (neox_zoology.io.atomic_path)."""
    with atomic_path(path, temp_suffix=f".partial-{os.getpid()}") as partial, \
            open(partial, "wb") as f:  # a file object: np.savez adds no .npz to the name
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


FIELDS = ("format", "keys", "counts", "eval_counts", "vocab_size", "tokenizer", "tokenizer_id",
           "train_tokens", "train_available", "max_train_tokens", "eval_tokens", "train_prefixes",
           "eval_prefixes")
OPTIONAL_FIELDS = ("train_documents", "eval_documents")  # absent in files that counted whole datasets
RECOUNT = "count again with python -m tokenization.bigrams"


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
        raise BigramCountsError(f"bigram counts file {path} not found; {RECOUNT}") from None
    except (OSError, ValueError) as exc:
        raise BigramCountsError(f"{path} is not a bigram counts file ({exc}); {RECOUNT}") from None
    missing = [name for name in FIELDS if name not in fields]
    if missing:
        raise BigramCountsError(f"{path} lacks {', '.join(missing)}: not a {FORMAT} file; {RECOUNT}")
    if str(fields["format"]) != FORMAT:
        raise BigramCountsError(f"{path} has format {str(fields['format'])!r}, this code reads {FORMAT!r}; "
                                f"{RECOUNT}")
    keys, counts, eval_counts = fields["keys"], fields["counts"], fields["eval_counts"]
    vocab_size = int(fields["vocab_size"])
    if not (keys.dtype == counts.dtype == eval_counts.dtype == np.int64
            and keys.ndim == 1 and keys.shape == counts.shape == eval_counts.shape):
        raise BigramCountsError(f"{path}: keys, counts and eval_counts must be int64 arrays of one length; "
                                f"{RECOUNT}")
    if keys.size and (np.any(keys[1:] <= keys[:-1]) or keys[0] < 0 or keys[-1] >= vocab_size ** 2):
        raise BigramCountsError(f"{path}: keys are not sorted distinct bigrams of a {vocab_size}-token "
                                f"vocabulary; {RECOUNT}")
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
                                    f"{RECOUNT}")
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
            f"padded embedding size), or {RECOUNT} on data made with this tokenizer"
        )
    if isinstance(expected_tokenizer, str):
        if expected_tokenizer != result.tokenizer_id:
            raise BigramCountsError(
                f"{path} was counted on data tokenized by {result.tokenizer_id} but the evaluation "
                f"expects {expected_tokenizer!r}; {RECOUNT} on data made with the evaluation's tokenizer "
                "(or pass the Tokenizer itself, whose files are then hashed and compared)"
            )
    elif expected_tokenizer is not None:
        expected = as_identity(expected_tokenizer)
        if not same_tokenizer(tokenizer, expected):
            raise BigramCountsError(
                f"{path} was counted on data tokenized by {result.tokenizer_id} "
                f"(files {tokenizer['files']}) but the evaluation uses {identity_id(expected)} "
                f"(files {expected['files']}); {RECOUNT} on data made with the evaluation's tokenizer"
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

"""Tokenize JSON-lines documents (the Pile's format) into megatron-core indexed datasets.

    python -m tokenization.preprocess --input train/ val.jsonl.zst,more.jsonl \
        --output-prefix data/pile/pile_train --tokenizer-type GPT2BPETokenizer \
        --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt --append-eod \
        [--jsonl-keys text] [--workers N] [--max-bad-fraction 0.01]

Input: one document per line, ``{"text": ..., "meta": {"pile_set_name": ...}}``, in plain ``.jsonl``
(or ``.json``) files or zstandard-compressed ``.jsonl.zst`` / ``.json.zst`` files (multi-frame files
included). ``--input`` takes files, comma-separated lists, folders (their supported files, sorted)
and quoted glob patterns.

Output, for each key K of ``--jsonl-keys`` (default ``text``):

    P_K_document.bin, .idx   a megatron-core IndexedDataset written through its IndexedDatasetBuilder:
                             one sequence per document (followed by eod with --append-eod), in input
                             order. ``data_path`` / ``train_data_paths`` name the prefix
                             ``P_K_document``. Tokens are uint16 when the vocabulary has fewer than
                             65500 ids, else int32 (megatron-core's DType.optimal_dtype).
    P_K_document.json        what made the dataset: the tokenizer (type, vocab size, eod, sha256 of
                             its files: tokenization.bigrams refuses to mix datasets whose tokenizers
                             differ), the key, eod setting, and document/token counts.

and once per run ``P_report.json``: the summary printed at the end (documents, tokens, skipped
lines by reason, documents and tokens per ``meta.pile_set_name``) plus every skipped line as file,
line, reason and detail. It is written for failed and interrupted runs too.

Bad input is skipped and counted, never dropped silently. Reasons:

    invalid_utf8    the line is not UTF-8, or its text holds an unpaired surrogate (a \\ud800-style
                    escape), which no tokenizer can encode
    invalid_json    the line is not JSON
    not_an_object   the line is JSON but not an object
    missing_key     the object has no such --jsonl-keys key
    not_a_string    the key's value is not a string (null, a number, a list, ...)
    empty           a blank line, or a text that is empty or whitespace only
    truncated_zst   a .zst file ends in the middle of a frame: its complete lines are kept, the cut
                    line is reported (anything after the cut is gone from the file itself)
    corrupt_zst     a .zst file holds undecodable data: the lines before it are kept, the rest of
                    that file is skipped

When more than --max-bad-fraction of the lines read are skipped (checked once 1000 lines are in,
and at the end), the run stops with an error naming the file and line of the last bad line.

Nothing partial is ever readable: each .bin/.idx/.json is written under a ``.partial-<pid>`` name
and renamed into place only when the whole input is done, the .idx last (megatron-core cannot open
a prefix without it). On an error or Ctrl-C the partial files are deleted, and a dataset already at
the output prefix stays as it was.

Parallelism: the main process reads and decompresses the inputs and cuts them into chunks of whole
lines; ``--workers`` processes parse and tokenize chunks, each on one thread; the main process
writes their token arrays in input order, so the output does not depend on the number of workers.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import itertools
import json
import multiprocessing
import os
import signal
import struct
import sys
import time
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from neox_zoology.io import atomic_write_json
from neox_zoology.tokenizer import Tokenizer, build_tokenizer, tokenizer_identity

FORMAT = "neox_zoology.preprocess/1"
SUFFIXES = (".jsonl", ".json", ".jsonl.zst", ".json.zst")
REASONS = ("invalid_utf8", "invalid_json", "not_an_object", "missing_key", "not_a_string", "empty",
           "truncated_zst", "corrupt_zst")
NO_SET = "(none)"  # documents without a string meta.pile_set_name
EARLY_CHECK_LINES = 1000  # --max-bad-fraction is enforced from this many lines on (and at the end)
READ_BYTES = 1 << 20  # bytes read from an input file at a time (compressed bytes for .zst)
PARTIAL = ".partial-"


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
class _Chunk:
    file: int  # index into the input list
    path: str
    first_line: int  # 1-based line number of the chunk's first line
    data: bytes  # whole lines (the last one may lack its newline at the end of a file)
    position: int  # bytes of the file (compressed bytes for .zst) consumed once this chunk is read


@dataclass
class _Skip:
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


def _read_chunks(path: Path, index: int, chunk_bytes: int) -> Iterator[_Chunk | _Skip]:
    """Chunks of about ``chunk_bytes`` of whole lines, in order; a _Skip where a .zst goes bad."""
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
                yield _Chunk(index, str(path), line, piece, position)
                line += piece.count(b"\n")
    except _ZstEnd as end:
        cut = pending.rfind(b"\n")
        if cut >= 0:
            yield _Chunk(index, str(path), line, pending[:cut + 1], end.position)
            line += pending.count(b"\n", 0, cut + 1)
        partial = pending[cut + 1:]
        detail = end.detail + (f" ({len(partial)} bytes of it were read)" if partial else "")
        yield _Skip(index, line, end.reason, detail, end.position)
        return
    if pending:
        yield _Chunk(index, str(path), line, pending, position)


# ------------------------------------------------------------- parsing and tokenizing (workers)


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _unpaired_surrogate(text: str) -> str | None:
    """Where ``text`` cannot be UTF-8 (a lone surrogate from a JSON escape), else None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"unpaired surrogate \\u{ord(text[exc.start]):04x} at character {exc.start}"
    return None


def _single_thread_batch_encoder(tokenizer: Tokenizer):
    """A function encoding a list of texts on the calling thread only.

    Tokenizers backed by the ``tokenizers`` library use its ``encode_batch_fast`` (the same ids as
    ``encode``, without computing character offsets: about 1.4x faster per document); with
    TOKENIZERS_PARALLELISM=false it stays on one thread. Others encode document by document.
    """
    backend = getattr(tokenizer, "_tok", None)
    fast = getattr(backend, "encode_batch_fast", None)
    if fast is not None:
        return lambda texts: [encoding.ids for encoding in fast(texts)]
    return lambda texts: [tokenizer.encode(text) for text in texts]


@dataclass
class _Spec:
    """Everything a worker needs, picklable."""

    tokenizer_type: str
    vocab_file: str | None
    merge_file: str | None
    keys: tuple[str, ...]
    append_eod: bool
    dtype: str


class _ChunkTokenizer:
    """Parses and tokenizes one chunk; returns token arrays, lengths, per-set counts and skips."""

    def __init__(self, spec: _Spec):
        self.spec = spec
        self.tokenizer = build_tokenizer(spec.tokenizer_type, spec.vocab_file, spec.merge_file)
        self.encode = _single_thread_batch_encoder(self.tokenizer)
        self.dtype = np.dtype(spec.dtype)

    def _lines(self, data: bytes) -> list[str | tuple[str, str]]:
        """Decoded lines; an undecodable line becomes ("invalid_utf8", detail)."""
        if data.endswith(b"\n"):
            data = data[:-1]
        try:
            return data.decode("utf-8").split("\n")
        except UnicodeDecodeError:
            pass
        lines: list[str | tuple[str, str]] = []
        for raw in data.split(b"\n"):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                lines.append(("invalid_utf8", f"byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} "
                                              f"of the line is not UTF-8 ({exc.reason})"))
        return lines

    def __call__(self, chunk: _Chunk) -> dict:
        keys = self.spec.keys
        skipped: list[tuple[int, str, str]] = []
        line_nos: list[int] = []
        set_names: list[str] = []
        texts: list[list[str]] = [[] for _ in keys]
        lines = self._lines(chunk.data)
        if chunk.first_line == 1 and lines and type(lines[0]) is str and lines[0].startswith("\ufeff"):
            lines[0] = lines[0][1:]  # a UTF-8 byte order mark opening the file
        loads = json.loads
        for offset, line in enumerate(lines):
            line_no = chunk.first_line + offset
            if type(line) is tuple:
                skipped.append((line_no, *line))
                continue
            if not line or line.isspace():
                skipped.append((line_no, "empty", "blank line"))
                continue
            try:
                record = loads(line)
            except ValueError as exc:
                skipped.append((line_no, "invalid_json", f"{getattr(exc, 'msg', exc)} (column "
                                                         f"{getattr(exc, 'colno', '?')})"))
                continue
            if type(record) is not dict:
                skipped.append((line_no, "not_an_object", f"a JSON line holding {_json_type(record)}, "
                                                          "not an object"))
                continue
            values = []
            for key in keys:
                if key not in record:
                    present = ", ".join(repr(k) for k in list(record)[:8]) or "none"
                    skipped.append((line_no, "missing_key", f"no key {key!r} (keys: {present}); "
                                                            "choose the key with --jsonl-keys"))
                    break
                value = record[key]
                if type(value) is not str:
                    skipped.append((line_no, "not_a_string", f"{key!r} is {_json_type(value)}, "
                                                             "not a string"))
                    break
                if not value or value.isspace():
                    skipped.append((line_no, "empty", f"{key!r} is " +
                                    ("empty" if not value else "whitespace only")))
                    break
                values.append(value)
            else:
                meta = record.get("meta")
                name = meta.get("pile_set_name") if type(meta) is dict else None
                set_names.append(name if type(name) is str else NO_SET)
                line_nos.append(line_no)
                for column, value in zip(texts, values):
                    column.append(value)

        ids, keep = self._encode_all(texts, line_nos, skipped, chunk)
        if keep is not None:
            line_nos = [line_nos[i] for i in keep]
            set_names = [set_names[i] for i in keep]
        return self._arrays(chunk, lines, ids, line_nos, set_names, skipped)

    def _encode_all(self, texts, line_nos, skipped, chunk):
        """Token ids per key; documents no tokenizer can encode are dropped from every key."""
        try:
            return [self.encode(column) for column in texts], None
        except Exception as exc:  # noqa: BLE001 - narrowed below: only unencodable text is skipped
            error = exc
        keep = []
        for i, line_no in enumerate(line_nos):
            where = next(((key, w) for key, column in zip(self.spec.keys, texts)
                          if (w := _unpaired_surrogate(column[i]))), None)
            if where is None:
                keep.append(i)
            else:
                skipped.append((line_no, "invalid_utf8", f"{where[0]!r} holds an {where[1]}"))
        if len(keep) == len(line_nos):
            first, last = line_nos[0], line_nos[-1]
            raise RuntimeError(f"{chunk.path}:{first}-{last}: {self.spec.tokenizer_type} failed on these "
                               f"lines: {error}") from error
        texts = [[column[i] for i in keep] for column in texts]
        return [self.encode(column) for column in texts], keep

    def _arrays(self, chunk, lines, ids, line_nos, set_names, skipped) -> dict:
        eod = self.tokenizer.eod
        n = len(line_nos)
        lengths = [np.fromiter(map(len, column), np.int64, count=n) for column in ids]
        empty = np.zeros(n, bool)
        for column_lengths in lengths:
            empty |= column_lengths == 0
        if empty.any():  # text that encodes to no tokens at all
            for i in np.flatnonzero(empty):
                skipped.append((line_nos[i], "empty", "the text encodes to no tokens"))
            keep = np.flatnonzero(~empty)
            ids = [[column[i] for i in keep] for column in ids]
            lengths = [column_lengths[keep] for column_lengths in lengths]
            set_names = [set_names[i] for i in keep]
        tokens = []
        for column in ids:
            if self.spec.append_eod:
                for doc in column:
                    doc.append(eod)
            total = sum(map(len, column))
            tokens.append(np.fromiter(itertools.chain.from_iterable(column), self.dtype, count=total))
        if self.spec.append_eod:
            lengths = [column_lengths + 1 for column_lengths in lengths]
        sets: dict[str, list[int]] = {}
        per_doc = sum(lengths) if lengths else np.zeros(0, np.int64)
        for name, count in zip(set_names, per_doc.tolist()):
            entry = sets.setdefault(name, [0, 0])
            entry[0] += 1
            entry[1] += count
        skipped.sort()
        return {
            "file": chunk.file,
            "lines": len(lines),
            "tokens": tokens,
            "lengths": [column_lengths.astype(np.int32) for column_lengths in lengths],
            "sets": sets,
            "skipped": skipped,
            "position": chunk.position,
        }


def _skip_result(skip: _Skip) -> dict:
    return {"file": skip.file, "lines": 1, "tokens": None, "lengths": None, "sets": {},
            "skipped": [(skip.line, skip.reason, skip.detail)], "position": skip.position}


_WORKER: _ChunkTokenizer | None = None


def _init_worker(spec: _Spec) -> None:
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled by the main process
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker
    _WORKER = _ChunkTokenizer(spec)


def _work(chunk: _Chunk) -> dict:
    return _WORKER(chunk)


@contextlib.contextmanager
def _tokenizers_single_threaded():
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _ordered_results(tasks: Iterator[_Chunk | _Skip], spec: _Spec, workers: int) -> Iterator[dict]:
    """Results of ``tasks`` in task order, computed in this process or by ``workers`` processes."""
    if workers == 1:
        with _tokenizers_single_threaded():
            process = _ChunkTokenizer(spec)
            for task in tasks:
                yield process(task) if isinstance(task, _Chunk) else _skip_result(task)
        return
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    def result(item):
        return item if isinstance(item, dict) else item.result()

    # spawn, not fork: the parent has imported torch (through megatron-core) and may hold threads.
    executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(spec,))
    finished = False
    try:
        pending: deque = deque()  # bounded, so memory does not grow with the input
        for task in tasks:
            pending.append(executor.submit(_work, task) if isinstance(task, _Chunk) else _skip_result(task))
            while len(pending) > 2 * workers:
                yield result(pending.popleft())
        while pending:
            yield result(pending.popleft())
        finished = True
    except BrokenProcessPool as exc:
        # e.g. the kernel's out-of-memory killer; concurrent.futures notices (a Pool would hang), in
        # the result of a submitted chunk or, once the pool is marked broken, in the next submit
        raise RuntimeError(f"a preprocessing worker process died ({exc}); the run stopped and "
                           "wrote no dataset: run it again, with fewer --workers if memory is "
                           "short") from None
    finally:
        # On an error or Ctrl-C: drop queued chunks; workers end after the chunk they hold.
        executor.shutdown(wait=finished, cancel_futures=not finished)


# --------------------------------------------------------------------------------------- writing


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


def _remove_stale_partials(prefixes: Iterable[str]) -> None:
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


# ----------------------------------------------------------------------------------------- run


@dataclass
class _Tally:
    paths: list[Path]
    keys: tuple[str, ...]
    max_bad_fraction: float
    report_path: Path
    lines: int = 0
    documents: int = 0
    tokens: list[int] = field(default_factory=list)
    sets: dict = field(default_factory=dict)  # pile_set_name -> [documents, tokens of all keys]
    skipped: list[tuple[str, int, str, str]] = field(default_factory=list)

    def __post_init__(self):
        self.tokens = [0] * len(self.keys)

    def add(self, result: dict, builders: list) -> None:
        path = str(self.paths[result["file"]])
        self.lines += result["lines"]
        self.skipped += [(path, line, reason, detail) for line, reason, detail in result["skipped"]]
        if result["tokens"] is not None:
            for k, (tokens, lengths) in enumerate(zip(result["tokens"], result["lengths"])):
                builders[k].add_documents(tokens, lengths)
                self.tokens[k] += int(tokens.size)
            self.documents += len(result["lengths"][0]) if result["lengths"] else 0
            for name, (docs, tokens) in result["sets"].items():
                entry = self.sets.setdefault(name, [0, 0])
                entry[0] += docs
                entry[1] += tokens
        self.check(final=False)

    def check(self, final: bool) -> None:
        bad = len(self.skipped)
        if not bad or (not final and self.lines < EARLY_CHECK_LINES):
            return
        if bad > self.max_bad_fraction * self.lines:
            path, line, reason, detail = self.skipped[-1]
            raise PreprocessError(
                f"{path}:{line}: {reason}: {detail}. {bad} of the {self.lines} lines read so far are "
                f"bad ({100 * bad / self.lines:.2f}%), more than --max-bad-fraction "
                f"{self.max_bad_fraction}; every bad line is listed in {self.report_path}. Fix the "
                "input, or raise --max-bad-fraction to skip them"
            )

    def by_reason(self) -> dict[str, int]:
        counts = {reason: 0 for reason in REASONS}
        for _, _, reason, _ in self.skipped:
            counts[reason] += 1
        return {reason: n for reason, n in counts.items() if n}


def preprocess(
    inputs: Iterable[str | os.PathLike],
    output_prefix: str | os.PathLike,
    tokenizer_type: str,
    vocab_file: str | os.PathLike | None = None,
    merge_file: str | os.PathLike | None = None,
    *,
    jsonl_keys: Iterable[str] = ("text",),
    append_eod: bool = False,
    workers: int | None = None,
    max_bad_fraction: float = 0.01,
    chunk_bytes: int = 1 << 20,
    progress: bool = True,
) -> dict:
    """Tokenize ``inputs`` into ``<output_prefix>_<key>_document.bin/.idx``; return the summary.

    The summary (also in ``<output_prefix>_report.json``) has ``documents``, ``tokens``, ``lines``,
    ``skipped``, ``skipped_by_reason``, ``pile_set_names`` (name -> documents, tokens), ``datasets``
    (key -> dataset prefix), ``seconds``, ``docs_per_s``, ``tokens_per_s``, ``workers`` and
    ``tokenizer`` (its identity). Raises PreprocessError for bad arguments and for bad lines beyond
    ``max_bad_fraction``; nothing is left at the output prefix then.
    """
    start = time.perf_counter()
    paths = expand_inputs(inputs)
    keys = tuple(dict.fromkeys(k for key in jsonl_keys for k in str(key).split(",") if k))
    if not keys:
        raise PreprocessError("--jsonl-keys names no key: give the JSON key(s) holding the text")
    if not 0 <= max_bad_fraction <= 1:
        raise PreprocessError(f"--max-bad-fraction {max_bad_fraction} is not a fraction in [0, 1]")
    workers = workers if workers is not None else _cores()
    if workers < 1:
        raise PreprocessError(f"--workers {workers}: give at least 1")
    if chunk_bytes < 1:
        raise PreprocessError(f"chunk_bytes {chunk_bytes}: give at least 1")
    prefix = Path(output_prefix)
    if prefix.is_dir() or not prefix.name:
        raise PreprocessError(f"--output-prefix {str(output_prefix)!r} is a folder: give a folder and "
                              "a file-name prefix, e.g. data/pile/pile_train")
    tokenizer = build_tokenizer(tokenizer_type, None if vocab_file is None else str(vocab_file),
                                None if merge_file is None else str(merge_file))
    identity = tokenizer_identity(tokenizer)
    dtype = token_dtype(tokenizer.vocab_size)
    spec = _Spec(tokenizer_type, None if vocab_file is None else str(vocab_file),
                 None if merge_file is None else str(merge_file), keys, append_eod, dtype.name)

    prefix.parent.mkdir(parents=True, exist_ok=True)
    datasets = {key: f"{prefix}_{key}_document" for key in keys}
    report_path = Path(f"{prefix}_report.json")
    _remove_stale_partials([*datasets.values(), str(report_path)[:-len(".json")]])
    pid = os.getpid()
    partial = {key: {ext: Path(f"{ds}.{ext}{PARTIAL}{pid}") for ext in ("bin", "idx", "json")}
               for key, ds in datasets.items()}
    tally = _Tally(paths, keys, max_bad_fraction, report_path)
    sizes = [p.stat().st_size for p in paths]
    done_before = [sum(sizes[:i]) for i in range(len(paths))]

    def summary(status: str, error: str | None = None) -> dict:
        now = time.perf_counter()
        seconds, working = now - start, now - (work_start or now)
        tokens = sum(tally.tokens)
        return {
            "status": status,
            **({"error": error} if error else {}),
            "inputs": [str(p) for p in paths],
            "datasets": datasets,
            "tokenizer": identity,
            "jsonl_keys": list(keys),
            "append_eod": append_eod,
            "dtype": dtype.name,
            "workers": workers,
            "documents": tally.documents,
            "tokens": tokens,
            "tokens_by_key": dict(zip(keys, tally.tokens)),
            "lines": tally.lines,
            "skipped": len(tally.skipped),
            "skipped_by_reason": tally.by_reason(),
            "max_bad_fraction": max_bad_fraction,
            "pile_set_names": {name: {"documents": d, "tokens": t}
                               for name, (d, t) in sorted(tally.sets.items())},
            "seconds": round(seconds, 3),  # all of it: imports, tokenizer loading, writing
            "processing_seconds": round(working, 3),  # reading, tokenizing, writing
            "docs_per_s": round(tally.documents / working, 1) if working else None,
            "tokens_per_s": round(tokens / working, 1) if working else None,
            "report": str(report_path),
        }

    def report(result: dict) -> None:
        skipped = [{"file": f, "line": line, "reason": r, "detail": d} for f, line, r, d in tally.skipped]
        atomic_write_json(report_path, {"format": FORMAT, **result, "skipped_lines": skipped},
                          temp_suffix=f"{PARTIAL}{os.getpid()}")

    from tqdm import tqdm

    builder_class = array_builder_class()
    builders, work_start = [], None
    try:
        builders = [builder_class(str(partial[key]["bin"]), dtype.type) for key in keys]
        tasks = (task for i, path in enumerate(paths) for task in _read_chunks(path, i, chunk_bytes))
        work_start = time.perf_counter()
        with tqdm(total=sum(sizes), unit="B", unit_scale=True, unit_divisor=1024, desc="preprocess",
                  disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar, \
                contextlib.closing(_ordered_results(tasks, spec, workers)) as results:
            for result in results:
                tally.add(result, builders)
                bar.update(done_before[result["file"]] + result["position"] - bar.n)
                elapsed = max(time.perf_counter() - work_start, 1e-9)
                bar.set_postfix_str(f"{tally.documents / elapsed:,.0f} docs/s, "
                                    f"{sum(tally.tokens) / elapsed:,.0f} tokens/s", refresh=False)
        tally.check(final=True)
        if tally.documents == 0:
            raise PreprocessError(f"no document in {', '.join(map(str, paths))} has a usable "
                                  f"{'/'.join(keys)}: nothing to write")
        for builder, key in zip(builders, keys):
            builder.finalize(str(partial[key]["idx"]))
        result = summary("complete")
        for k, key in enumerate(keys):
            record = {
                "format": FORMAT,
                "key": key,
                "tokenizer": identity,
                "append_eod": append_eod,
                "dtype": dtype.name,
                "documents": tally.documents,
                "tokens": tally.tokens[k],
                # per-set tokens count every key, so they describe this dataset only with one key
                "pile_set_names": result["pile_set_names"] if len(keys) == 1 else None,
                "inputs": result["inputs"],
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            partial[key]["json"].write_text(json.dumps(record, indent=1) + "\n")
        for key, dataset in datasets.items():
            # Old .idx first, new .idx last: no moment pairs a new .bin with an old .idx.
            for ext in ("idx", "json", "bin"):
                Path(f"{dataset}.{ext}").unlink(missing_ok=True)
            for ext in ("bin", "json", "idx"):
                os.replace(partial[key][ext], f"{dataset}.{ext}")
    except BaseException as exc:
        for builder in builders:
            builder.data_file.close()
        for files in partial.values():
            for path in files.values():
                path.unlink(missing_ok=True)
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        with contextlib.suppress(Exception):
            report(summary(status, str(exc) or type(exc).__name__))
        raise
    report(result)
    return result


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def format_summary(result: dict) -> str:
    """The human-readable summary printed at the end of a run."""
    lines = [
        f"{result['documents']:,} documents, {result['tokens']:,} tokens from {len(result['inputs'])} "
        f"file(s) in {result['seconds']:.1f} s; processing {result['processing_seconds']:.1f} s: "
        f"{result['docs_per_s'] or 0:,.0f} docs/s, {result['tokens_per_s'] or 0:,.0f} tokens/s with "
        f"{result['workers']} worker(s)",
    ]
    pct = 100 * result["skipped"] / result["lines"] if result["lines"] else 0.0
    reasons = ", ".join(f"{r} {n}" for r, n in result["skipped_by_reason"].items()) or "none"
    lines.append(f"skipped {result['skipped']:,} of {result['lines']:,} lines ({pct:.3f}%): {reasons}; "
                 f"each one is listed with file:line in {result['report']}")
    sets = result["pile_set_names"]
    if sets:
        width = max(len("pile_set_name"), *map(len, sets))
        lines.append(f"  {'pile_set_name':<{width}}  {'documents':>12}  {'tokens':>15}")
        for name, counts in sorted(sets.items(), key=lambda kv: -kv[1]["tokens"]):
            lines.append(f"  {name:<{width}}  {counts['documents']:>12,}  {counts['tokens']:>15,}")
    for key, dataset in result["datasets"].items():
        lines.append(f"wrote {dataset}.bin/.idx ({result['dtype']}, {result['tokens_by_key'][key]:,} "
                     f"tokens of {key!r}) and {dataset}.json")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tokenization.preprocess",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Bad lines and outputs: see the module docstring.")
    parser.add_argument("--input", nargs="+", required=True,
                        help="JSON-lines files (.jsonl, .json, .jsonl.zst, .json.zst): paths, "
                             "comma-separated lists, folders or quoted glob patterns")
    parser.add_argument("--output-prefix", required=True,
                        help="writes PREFIX_<key>_document.bin/.idx/.json and PREFIX_report.json")
    parser.add_argument("--tokenizer-type", required=True,
                        help="GPT2BPETokenizer, HFTokenizer or SPMTokenizer")
    parser.add_argument("--vocab-file", help="vocabulary / tokenizer JSON / SentencePiece model")
    parser.add_argument("--merge-file", help="BPE merges (GPT2BPETokenizer)")
    parser.add_argument("--append-eod", action="store_true", help="end every document with eod")
    parser.add_argument("--jsonl-keys", nargs="+", default=["text"],
                        help="JSON key(s) holding the text; one dataset per key (default: text)")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"tokenizing processes (default: the {_cores()} available cores)")
    parser.add_argument("--max-bad-fraction", type=float, default=0.01,
                        help="fail when more than this fraction of lines is bad (default: 0.01)")
    parser.add_argument("--chunk-mb", type=float, default=1.0,
                        help="MiB of lines per work item (default: 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        result = preprocess(
            args.input, args.output_prefix, args.tokenizer_type, args.vocab_file, args.merge_file,
            jsonl_keys=args.jsonl_keys, append_eod=args.append_eod, workers=args.workers,
            max_bad_fraction=args.max_bad_fraction, chunk_bytes=max(1, int(args.chunk_mb * (1 << 20))),
            progress=not args.no_progress,
        )
    except (PreprocessError, ValueError, RuntimeError) as exc:
        sys.exit(f"preprocess: error: {exc}")
    except KeyboardInterrupt:
        print("preprocess: interrupted; no dataset was written (partial files removed)", file=sys.stderr)
        sys.exit(130)
    print(format_summary(result))


if __name__ == "__main__":
    main()

"""Parsing and tokenizing chunks of JSON lines, in this process or in worker processes, results in order.

`ChunkTokenizer` turns one `Chunk` into token arrays, document lengths, per-`pile_set_name` counts and
the skipped lines with their reasons; `ordered_results` runs it over all chunks, in this process
(`workers == 1`) or in spawned processes of one tokenizer thread each, and yields the results in input
order, so the output does not depend on the number of workers. A dying worker stops the run.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from neox_zoology.tokenizer import Tokenizer, build_tokenizer
from tokenization.preprocess_read import Chunk, Skip

NO_SET = "(none)"  # documents without a string meta.pile_set_name


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
class WorkerSpec:
    """Everything a worker needs, picklable."""

    tokenizer_type: str
    vocab_file: str | None
    merge_file: str | None
    keys: tuple[str, ...]
    append_eod: bool
    dtype: str


class ChunkTokenizer:
    """Parses and tokenizes one chunk; returns token arrays, lengths, per-set counts and skips."""

    def __init__(self, spec: WorkerSpec):
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

    def __call__(self, chunk: Chunk) -> dict:
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


def skip_result(skip: Skip) -> dict:
    return {"file": skip.file, "lines": 1, "tokens": None, "lengths": None, "sets": {},
            "skipped": [(skip.line, skip.reason, skip.detail)], "position": skip.position}


_WORKER: ChunkTokenizer | None = None


def _init_worker(spec: WorkerSpec) -> None:
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled by the main process
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker
    _WORKER = ChunkTokenizer(spec)


def _work(chunk: Chunk) -> dict:
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


def ordered_results(tasks: Iterator[Chunk | Skip], spec: WorkerSpec, workers: int) -> Iterator[dict]:
    """Results of ``tasks`` in task order, computed in this process or by ``workers`` processes."""
    if workers == 1:
        with _tokenizers_single_threaded():
            process = ChunkTokenizer(spec)
            for task in tasks:
                yield process(task) if isinstance(task, Chunk) else skip_result(task)
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
            pending.append(executor.submit(_work, task) if isinstance(task, Chunk) else skip_result(task))
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

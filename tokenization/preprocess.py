"""Tokenize JSON-lines documents (the Pile's format) into megatron-core indexed datasets.

    python -m tokenization.preprocess --input train/ val.jsonl.zst,more.jsonl \
        --output-prefix data/pile/pile_train --tokenizer-type GPT2BPETokenizer \
        --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt --append-eod \
        [--jsonl-keys text] [--workers N] [--max-bad-fraction 0.01]

For each key K of ``--jsonl-keys``: ``P_K_document.bin/.idx`` (one sequence per document, in input
order) and ``P_K_document.json`` (the tokenizer's identity and the counts); once per run
``P_report.json`` (the summary and every skipped line; written for failed and interrupted runs too).

Invariants: a bad line is skipped and counted by reason, never dropped silently, and the run stops
once more than --max-bad-fraction of the lines read are bad; nothing partial is ever readable (each
file is renamed into place, the .idx last, only when the whole input is done, and a dataset already at
the prefix stays as it was on any error); the output does not depend on --workers. Reading the input:
preprocess_read.py; tokenizing: preprocess_tokenize.py; writing: preprocess_write.py; the formats and
the reasons for skipping a line: docs/data.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from neox_zoology.io import atomic_write_json
from neox_zoology.tokenizer import build_tokenizer, tokenizer_identity
from tokenization.preprocess_read import SUFFIXES, PreprocessError, expand_inputs, read_chunks
from tokenization.preprocess_tokenize import ChunkTokenizer, WorkerSpec, ordered_results
from tokenization.preprocess_write import PARTIAL, array_builder_class, remove_stale_partials, token_dtype

__all__ = ["FORMAT", "SUFFIXES", "REASONS", "PARTIAL", "PreprocessError", "expand_inputs", "ChunkTokenizer",
           "array_builder_class", "token_dtype", "preprocess", "format_summary", "main"]

FORMAT = "neox_zoology.preprocess/1"
REASONS = ("invalid_utf8", "invalid_json", "not_an_object", "missing_key", "not_a_string", "empty",
           "truncated_zst", "corrupt_zst")
EARLY_CHECK_LINES = 1000  # --max-bad-fraction is enforced from this many lines on (and at the end)


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
    spec = WorkerSpec(tokenizer_type, None if vocab_file is None else str(vocab_file),
                 None if merge_file is None else str(merge_file), keys, append_eod, dtype.name)

    prefix.parent.mkdir(parents=True, exist_ok=True)
    datasets = {key: f"{prefix}_{key}_document" for key in keys}
    report_path = Path(f"{prefix}_report.json")
    remove_stale_partials([*datasets.values(), str(report_path)[:-len(".json")]])
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
        tasks = (task for i, path in enumerate(paths) for task in read_chunks(path, i, chunk_bytes))
        work_start = time.perf_counter()
        with tqdm(total=sum(sizes), unit="B", unit_scale=True, unit_divisor=1024, desc="preprocess",
                  disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar, \
                contextlib.closing(ordered_results(tasks, spec, workers)) as results:
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
                                     epilog="Outputs and bad lines: docs/data.md.")
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
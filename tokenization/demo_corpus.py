"""Build a small real-text training corpus from this Python installation's standard library.

    python -m tokenization.demo_corpus --out data/demo [--max-mb 8] [--vocab-size 4096]

Every machine that runs the project has the corpus at hand, so the CPU demo needs no download. Writes
into OUT the corpus in the Pile's JSONL format (one stdlib module per line), a SentencePiece BPE
tokenizer trained on it (`spm.model`, SPMTokenizer) and the dataset `OUT/stdlib_text_document`
(.bin/.idx/.json, made by tokenization.preprocess, the same path the Pile takes), then
`manifest.json`; the files are listed in docs/data.md.

Everything is built in a hidden temporary folder and renamed into place when complete, the manifest
last, so an interrupted build never leaves a partial dataset that looks usable. A finished build with
the same settings is not redone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tokenization.preprocess import preprocess
from tokenization.train_spm import train_spm

CORPUS = "corpus.jsonl"
TOKENIZER = "spm"  # prefix: spm.model + spm.vocab
OUTPUT_PREFIX = "stdlib"  # tokenization.preprocess names the dataset OUTPUT_PREFIX_text_document
DATA_PREFIX = f"{OUTPUT_PREFIX}_text_document"
REPORT = f"{OUTPUT_PREFIX}_report.json"
MANIFEST = "manifest.json"
OUTPUTS = (CORPUS, f"{TOKENIZER}.model", f"{TOKENIZER}.vocab", f"{DATA_PREFIX}.bin",
           f"{DATA_PREFIX}.json", REPORT, f"{DATA_PREFIX}.idx")  # renamed in this order, then MANIFEST
PILE_SET_NAME = "python-stdlib"
TEMP_PREFIX = ".building-"

# Test suites are full of deliberately odd code; installed third-party packages are not stdlib.
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_documents(max_bytes: int) -> Iterator[str]:
    """Yield stdlib ``.py`` sources in sorted path order until ``max_bytes`` of UTF-8 text."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        paths += [os.path.join(folder, f) for f in files if f.endswith(".py")]

    total = 0
    for path in sorted(paths):
        try:
            data = Path(path).read_bytes()
            text = data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # unreadable or another encoding (a few legacy modules declare latin-1)
        if not text.strip():
            continue
        if total + len(data) > max_bytes:
            return
        total += len(data)
        yield text


def _outputs_done(out: Path, settings: dict) -> dict | None:
    """The manifest of a finished build with these settings, else None."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    same = all(manifest.get(key) == value for key, value in settings.items())
    return manifest if same and all((out / name).is_file() for name in OUTPUTS) else None


def _write_indexed_dataset(folder: Path, corpus: Path, model: Path) -> dict:
    """Tokenize ``corpus`` with ``model`` into ``folder/DATA_PREFIX.bin/.idx``; return the summary."""
    # One worker: the corpus is small, and worker processes would cost more to start than they save.
    return preprocess([corpus], folder / OUTPUT_PREFIX, "SPMTokenizer", model, append_eod=True,
                      workers=1, max_bad_fraction=0.0, progress=False)


def build_demo_corpus(
    out_dir: str | os.PathLike, max_mb: float = 8, vocab_size: int = 4096
) -> dict:
    """Build (or find already built) the demo corpus in ``out_dir``; return paths and counts.

    The result has ``corpus``, ``tokenizer`` (the .model), ``data_prefix`` (for ``data_path``),
    ``documents``, ``tokens``, ``seconds`` and ``built`` (False when an earlier build was reused).
    """
    out = Path(out_dir)
    stdlib = sysconfig.get_paths()["stdlib"]
    settings = {"max_mb": max_mb, "vocab_size": vocab_size, "stdlib": stdlib,
                "pipeline": "tokenization.preprocess"}  # builds made before it are redone
    paths = {
        "corpus": str(out / CORPUS),
        "tokenizer": str(out / f"{TOKENIZER}.model"),
        "data_prefix": str(out / DATA_PREFIX),
    }
    done = _outputs_done(out, settings)
    if done is not None:
        return {**paths, **done, "seconds": 0.0, "built": False}

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(TEMP_PREFIX + "*"):  # left behind by an interrupted build
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=out))
    try:
        texts = list(stdlib_documents(int(max_mb * 1024 * 1024)))
        if not texts:
            raise ValueError(f"no stdlib sources fit in --max-mb {max_mb}: raise it")
        with open(tmp / CORPUS, "w", encoding="utf-8") as f:
            for text in texts:
                f.write(json.dumps({"text": text, "meta": {"pile_set_name": PILE_SET_NAME}}) + "\n")

        train_spm(texts, tmp / TOKENIZER, vocab_size)
        summary = _write_indexed_dataset(tmp, tmp / CORPUS, tmp / f"{TOKENIZER}.model")
        for name in (f"{DATA_PREFIX}.json", REPORT):  # name the final folder, not the build folder
            (tmp / name).write_text((tmp / name).read_text().replace(str(tmp), str(out)))

        manifest = {**settings, "documents": summary["documents"], "tokens": summary["tokens"],
                    "eod": summary["tokenizer"]["eod"]}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        # Remove an older build first (manifest, then .idx) and put the new .idx and manifest in
        # last, so no interruption can pair a new .bin with an old .idx or mark a partial build
        # finished.
        for name in (MANIFEST, *reversed(OUTPUTS)):
            (out / name).unlink(missing_ok=True)
        for name in (*OUTPUTS, MANIFEST):
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**paths, **manifest, "seconds": time.perf_counter() - start, "built": True}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tokenization.demo_corpus",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder, e.g. data/demo")
    parser.add_argument("--max-mb", type=float, default=8, help="MiB of source text (default: 8)")
    parser.add_argument("--vocab-size", type=int, default=4096, help="SentencePiece vocabulary")
    args = parser.parse_args(argv)

    result = build_demo_corpus(args.out, args.max_mb, args.vocab_size)
    counts = f"{result['documents']} documents, {result['tokens']} tokens"
    if result["built"]:
        print(f"demo corpus: {counts} in {result['seconds']:.1f} s -> {args.out}")
    else:
        print(f"demo corpus already built in {args.out} ({counts}); nothing to do")


if __name__ == "__main__":
    main()

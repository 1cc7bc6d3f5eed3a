"""Write a small sample in the Pile's layout and format, with bad lines planted, from local text.

    python -m tokenization.pile_sample --out data/pile_sample [--mb 4] [--seed 0] [--clean]

The Pile ships ``train/00.jsonl.zst ... 29.jsonl.zst``, ``val.jsonl.zst`` and ``test.jsonl.zst``,
one document per line: ``{"text": ..., "meta": {"pile_set_name": ...}}``. This writes the same
layout (``train/00..02``, ``val``, ``test``; ``train/00`` two zstd frames back to back, ``train/02``
cut short like an interrupted download), about ``--mb`` MiB of text, so the preprocessing -> bigram
counts -> training path can be run end to end without downloading the Pile. ``OUT/planted.json``
lists every planted bad line (file, line, reason) and the document counts.

The documents are local text, not Pile text: the standard library's modules ("python-stdlib") and
pydoc topic pages ("python-docs"), for larger samples installed packages' sources, cut at blank lines
into documents of about 3 KB and shuffled with ``--seed``. Bad lines of the kinds tokenization.preprocess
reports are planted in ``train/00`` and ``train/01`` (0.9% of the default sample's training lines, under
its default --max-bad-fraction); ``--clean`` writes no bad lines and no cut file (benchmarks). The
files and every planted line: docs/data.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sysconfig
from pathlib import Path

SETS = ("python-stdlib", "python-docs", "python-packages")
PIECE_BYTES = 3000  # texts are cut at blank lines into documents of about this size
TRUNCATE_AT = 0.6  # fraction of the cut file's bytes that is kept
SHARDS = ("train/00.jsonl.zst", "train/01.jsonl.zst", "train/02.jsonl.zst")
CUT_SHARD = "train/02.jsonl.zst"
# which of _bad_lines go into which file: every reason once, under 1% of the training lines
PLANT = {"train/00.jsonl.zst": (0, 1, 2, 3), "train/01.jsonl.zst": (4, 5, 6, 7)}


def local_documents(min_bytes: int = 0) -> list[tuple[str, str]]:
    """(pile_set_name, text) of local documents, in a fixed order: the pydoc topics and the standard
    library, then, while they hold fewer than ``min_bytes``, installed packages' sources."""
    from pydoc_data.topics import topics

    from tokenization.demo_corpus import stdlib_documents

    texts = [("python-docs", topics[name]) for name in sorted(topics)]
    texts += [("python-stdlib", text) for text in stdlib_documents(1 << 30)]
    total = sum(len(text.encode("utf-8")) for _, text in texts)
    if total < min_bytes:
        for path in _package_sources():
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            texts.append(("python-packages", text))
            total += len(text.encode("utf-8"))
            if total >= min_bytes:
                break
    return [(name, piece) for name, text in texts for piece in _pieces(text) if piece.strip()]


def _package_sources() -> list[Path]:
    root = Path(sysconfig.get_paths()["purelib"])
    return sorted(p for p in root.rglob("*.py") if "test" not in p.parent.name)


def _pieces(text: str) -> list[str]:
    """``text`` cut at blank lines into pieces of at least PIECE_BYTES characters (the last shorter)."""
    pieces, current, size = [], [], 0
    for paragraph in text.split("\n\n"):
        current.append(paragraph)
        size += len(paragraph) + 2
        if size >= PIECE_BYTES:
            pieces.append("\n\n".join(current))
            current, size = [], 0
    if current:
        pieces.append("\n\n".join(current))
    return pieces


def _bad_lines(good: str) -> list[tuple[bytes, str]]:
    """One bad line per reason, as (raw bytes, reason the preprocessor must report)."""
    meta = {"pile_set_name": "python-docs"}
    dump = lambda record: json.dumps(record).encode()  # noqa: E731
    stray = dump({"text": "caf\u00e9 au lait", "meta": meta}).replace("\\u00e9".encode(), b"\xe9")
    return [
        (good.encode()[: max(10, len(good) // 2)], "invalid_json"),
        (dump({"content": "the text is under another key", "meta": meta}), "missing_key"),
        (dump({"text": None, "meta": meta}), "not_a_string"),
        (stray, "invalid_utf8"),  # latin-1 e-acute: not UTF-8
        (b'{"text": "an unpaired surrogate \\ud83d here", "meta": {"pile_set_name": "python-docs"}}',
         "invalid_utf8"),
        (dump({"text": " \n\t ", "meta": meta}), "empty"),
        (dump(["text", "an array, not an object"]), "not_an_object"),
        (b"", "empty"),  # a blank line
    ]


def _compress(lines: list[bytes], frames: int = 1) -> bytes:
    import zstandard

    compressor = zstandard.ZstdCompressor(level=3)
    cut = [len(lines) * i // frames for i in range(frames + 1)]
    return b"".join(compressor.compress(b"".join(line + b"\n" for line in lines[a:b]))
                    for a, b in zip(cut, cut[1:]))


def _recoverable_lines(data: bytes) -> int:
    """Complete lines a streaming zstd decoder gets out of a cut file (zstd decodes whole blocks)."""
    import zstandard

    out = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return out.count(b"\n")


def write_pile_sample(out_dir: str | os.PathLike, mb: float = 4, seed: int = 0,
                      clean: bool = False) -> dict:
    """Write the sample into ``out_dir``; return what ``planted.json`` holds."""
    out = Path(out_dir)
    rng = random.Random(seed)
    budget, chosen, total = int(mb * (1 << 20)), [], 0
    docs = local_documents(min_bytes=budget)
    rng.shuffle(docs)
    for name, text in docs:
        size = len(text.encode("utf-8"))
        if total + size > budget:
            continue
        chosen.append((name, text))
        total += size
    if len(chosen) < 20:
        raise ValueError(f"--mb {mb} leaves only {len(chosen)} documents: give at least 0.2")

    # 90% train (three shards), 5% val, 5% test, as whole documents
    n_eval = max(2, len(chosen) // 20)
    parts = {"val.jsonl.zst": chosen[:n_eval], "test.jsonl.zst": chosen[n_eval:2 * n_eval]}
    train = chosen[2 * n_eval:]
    for i, shard in enumerate(SHARDS):
        parts[shard] = train[i::len(SHARDS)]

    planted, documents = [], {}
    for file, items in parts.items():
        rows: list[tuple[bytes, str | None]] = [
            (json.dumps({"text": text, "meta": {"pile_set_name": name}}).encode(), None)
            for name, text in items]
        if not clean:
            bad = _bad_lines(rows[0][0].decode())
            for raw, reason in (bad[i] for i in PLANT.get(file, ())):
                rows.insert(rng.randrange(1, len(rows) + 1), (raw, reason))
            planted += [{"file": file, "line": number, "reason": reason}
                        for number, (_, reason) in enumerate(rows, 1) if reason is not None]
        lines = [raw for raw, _ in rows]
        data = _compress(lines, frames=2 if file == SHARDS[0] else 1)
        kept = len(lines)
        if not clean and file == CUT_SHARD:
            data = data[: int(len(data) * TRUNCATE_AT)]
            kept = _recoverable_lines(data)
            planted.append({"file": file, "line": kept + 1, "reason": "truncated_zst"})
        path = out / file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        good = [json.loads(raw) for raw, reason in rows[:kept] if reason is None]
        documents[file] = {"documents": len(good), "per_set": {
            name: sum(r["meta"]["pile_set_name"] == name for r in good) for name in SETS}}
    manifest = {"seed": seed, "mb": mb, "clean": clean, "text_bytes": total,
                "documents": documents, "planted": planted}
    (out / "planted.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tokenization.pile_sample",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder, e.g. data/pile_sample")
    parser.add_argument("--mb", type=float, default=4, help="MiB of document text (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle and placement seed")
    parser.add_argument("--clean", action="store_true", help="plant no bad lines, cut no file")
    args = parser.parse_args(argv)
    manifest = write_pile_sample(args.out, args.mb, args.seed, args.clean)
    docs = sum(part["documents"] for part in manifest["documents"].values())
    print(f"wrote {docs} documents ({manifest['text_bytes'] / (1 << 20):.1f} MiB of text) and "
          f"{len(manifest['planted'])} planted bad lines to {args.out}")


if __name__ == "__main__":
    main()

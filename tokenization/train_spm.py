"""Train a SentencePiece BPE tokenizer for tokenizer_type SPMTokenizer.

    python -m tokenization.train_spm --input corpus.jsonl[,more.jsonl] --model-prefix P \
        --vocab-size N [--jsonl-key text] [--max-sentences N]

Writes ``P.model`` and ``P.vocab``. The model has ``<|endoftext|>`` as a control symbol: it gets
its own id (the eod appended after each document) but no text ever encodes to it, so a document
cannot forge a boundary. Ids 0-3 are unk, bos, eos and pad. Byte fallback lets any text encode,
and no normalisation is applied, so code keeps its whitespace and ``decode(encode(text)) == text``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

EOD_PIECE = "<|endoftext|>"


def iter_jsonl_texts(paths: Iterable[str | os.PathLike], key: str = "text") -> Iterator[str]:
    """Yield the ``key`` field of every line of the JSONL files (the Pile's format)."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[key]
                except (ValueError, KeyError, TypeError):
                    text = None
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{line_no}: no JSON string field {key!r}; "
                                     "pass --jsonl-key with the field that holds the text")
                yield text


def _sentences(texts: Iterable[str]) -> Iterator[str]:
    # SentencePiece learns from sentences; a line is the natural unit for both prose and code.
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                yield line


def train_spm(
    source: str | os.PathLike | Iterable[str] | Iterable[os.PathLike],
    model_prefix: str | os.PathLike,
    vocab_size: int,
    *,
    jsonl_key: str = "text",
    max_sentences: int = 200_000,
    num_threads: int | None = None,
    seed: int = 1234,
) -> str:
    """Train a BPE model and return the path of ``<model_prefix>.model``.

    ``source`` is one JSONL path (``str`` or ``os.PathLike``), a list of ``os.PathLike`` JSONL
    paths, or any other iterable of document texts (so a list of ``str`` is a list of texts).
    At most ``max_sentences`` lines, sampled at random, are used for training: the merges of a
    small vocabulary settle long before the whole corpus is seen.
    """
    import sentencepiece

    # Paths are told apart from texts by type only: a document may look like a file name.
    if isinstance(source, (str, os.PathLike)):
        source = [Path(source)]
    if isinstance(source, (list, tuple)) and source and all(
        isinstance(p, os.PathLike) for p in source
    ):
        texts = iter_jsonl_texts(source, jsonl_key)
    else:
        texts = source

    Path(model_prefix).parent.mkdir(parents=True, exist_ok=True)
    sentencepiece.set_random_generator_seed(seed)  # same corpus -> same sample -> same model
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=_sentences(texts),
        model_prefix=str(model_prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.9995,  # rare characters go to byte fallback instead of the vocab
        control_symbols=[EOD_PIECE],
        pad_id=3,  # a pad distinct from eod, which megatron-core's datasets ask for
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,  # like GPT-2: the text's own spaces are the word boundaries
        allow_whitespace_only_pieces=True,  # indentation becomes a few pieces, not many
        split_digits=True,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,  # warnings and errors only
    )
    return f"{model_prefix}.model"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tokenization.train_spm",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="comma-separated JSONL files")
    parser.add_argument("--model-prefix", required=True, help="writes PREFIX.model/.vocab")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--jsonl-key", default="text", help="JSON field holding the text")
    parser.add_argument("--max-sentences", type=int, default=200_000,
                        help="lines sampled for training (default: %(default)s)")
    args = parser.parse_args(argv)

    paths = [Path(p) for p in args.input.split(",") if p]
    for path in paths:
        if not path.is_file():
            parser.error(f"--input file {str(path)!r} does not exist")
    model = train_spm(paths, args.model_prefix, args.vocab_size, jsonl_key=args.jsonl_key,
                      max_sentences=args.max_sentences)
    print(f"wrote {model}")


if __name__ == "__main__":
    main()

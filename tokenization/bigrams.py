"""How often each bigram of the evaluation data occurred in the training data.

    python -m tokenization.bigrams --train-prefix P --eval-prefix Q --out counts.npz \
        [--split S] [--max-train-tokens N] [--max-eval-tokens N] \
        [--tokenizer-type T --vocab-file V [--merge-file M]]

``P`` and ``Q`` are dataset prefixes (``P.bin`` / ``P.idx``, as in ``train_data_paths``), several
comma-separated; ``--split S`` (GPT-NeoX's ``split``) counts the training documents of each ``P`` and
takes the bigrams of the validation documents of each ``Q``. ``--max-train-tokens N`` counts the first
N training tokens only. The evaluation bigrams are collected first; the training tokens are then
streamed past a hash table of them, so memory follows the distinct evaluation bigrams, not the training
size. Training and evaluation data made with different tokenizers (their ``.json`` records, or
``--tokenizer-type/--vocab-file/--merge-file`` for datasets made elsewhere) are refused.

Streams and document ranges: bigrams_data.py; the counting table: bigrams_counter.py; the counts file,
its checks and lookups: bigrams_file.py; the rules, the file's fields and measurements: docs/data.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from neox_zoology.tokenizer import dataset_tokenizer, identity_id, same_tokenizer
from tokenization.bigrams_counter import BigramCounter
from tokenization.bigrams_data import (
    BigramCountsError,
    DatasetInfo,
    Documents,
    dataset_info,
    eval_bigrams,
    info_of,
    pair_keys,
    split_documents,
    token_chunks,
)
from tokenization.bigrams_file import (
    FORMAT,
    BigramCounts,
    load_bigram_counts,
    lookup,
    lookup_keys,
    save_bigram_counts,
)

__all__ = ["FORMAT", "CHUNK_TOKENS", "BigramCountsError", "BigramCounter", "BigramCounts", "DatasetInfo",
           "Documents", "count_bigrams", "dataset_info", "eval_bigrams", "identity_id", "load_bigram_counts",
           "lookup", "lookup_keys", "pair_keys", "resolve_tokenizer", "save_bigram_counts", "split_documents",
           "token_chunks", "main"]

CHUNK_TOKENS = 1 << 20  # training tokens per step (2^15..2^20 measured within 5%; ~50 MB of temporaries)


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
    train_infos = [info_of(p) for p in train]
    eval_infos = [info_of(p) for p in evaluation]
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
                counter.update(pair_keys(chunk, vocab_size, info, offset))
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
                                     epilog="The counts file's fields: docs/data.md.")
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

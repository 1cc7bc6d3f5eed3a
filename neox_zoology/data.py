"""Training/validation batches from megatron-core datasets (.bin/.idx, GPTDataset, blending).

Sample order is a pure function of the iteration: micro-batch m of data-parallel rank r at step i
holds samples  i*G + (m*DP + r)*mb ... + mb  (G = global batch, mb = micro batch). So a resumed run
continues at exactly the right sample, and DP=2 sees the same samples as DP=1 with twice the
gradient accumulation.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from neox_zoology.indexed import IndexFileError, read_index


class DatasetTokenizer:
    """The few tokenizer facts megatron-core's GPTDataset reads (eod/pad ids, cache identity).

    megatron-core names its cached sample indices by a hash of these `unique_identifiers`; adding each
    dataset's content identity (`content_identity`) there means a dataset rebuilt at the same prefix
    never reuses the indices of the old one."""

    def __init__(self, tokenizer, prefixes=()):
        self.eod = tokenizer.eod
        self.pad = tokenizer.pad  # equal to eod -> megatron-core substitutes -1 (nothing is masked)
        self.vocab_size = tokenizer.vocab_size
        self.unique_identifiers = dict(tokenizer.unique_identifiers)
        self.unique_identifiers["datasets"] = {p: content_identity(p) for p in prefixes}


def content_identity(prefix: str) -> str:
    """Size and modification time of a dataset's .idx and .bin: changes whenever the pair is rewritten."""
    out = []
    for ext in (".idx", ".bin"):
        st = Path(prefix + ext).stat()
        out.append(f"{ext[1:]} {st.st_size} bytes mtime {st.st_mtime_ns}")
    return ", ".join(out)


def data_prefixes(args) -> list[str]:
    if args.data_path:
        return [args.data_path]
    return [p for key in ("train_data_paths", "valid_data_paths", "test_data_paths") for p in getattr(args, key) or []]


def check_data_identity(args, tokenizer) -> list[str]:
    """Refuse a dataset whose recorded tokenizer (tokenization.preprocess writes `<prefix>.json`) is not
    the run's (ConfigError naming both); returns notices for datasets without a record."""
    from neox_zoology.config import ConfigError
    from neox_zoology.tokenizer import dataset_tokenizer, identity_id, same_tokenizer, tokenizer_identity

    if tokenizer is None:
        return []
    mine, notices = tokenizer_identity(tokenizer), []
    for prefix in dict.fromkeys(data_prefixes(args)):
        try:
            record = dataset_tokenizer(prefix)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if record is None:
            notices.append(f"{prefix}: no tokenizer record ({prefix}.json), so its tokenizer cannot be checked "
                           f"against {identity_id(mine)}")
        elif not same_tokenizer(record, mine):
            raise ConfigError(
                f"{prefix} was tokenized by {identity_id(record)} (vocabulary {record.get('vocab_size')}, files "
                f"{record.get('files')}) but this run's tokenizer is {identity_id(mine)} (vocabulary "
                f"{mine['vocab_size']}, {args.tokenizer_type} {args.vocab_file}): the token ids mean other text. "
                f"Use the tokenizer that made the data, or tokenize the data again with this one")
    return notices


@dataclass
class Splits:
    train: object
    valid: object | None
    test: object | None


def _blend(paths, weights):
    if not paths:
        return None
    return (list(paths), [float(w) for w in weights] if weights else None)


def check_indexed_dataset(prefix: str, vocab_size: int | None = None, sample_tokens: int = 1 << 20) -> int:
    """Check a megatron .bin/.idx pair before megatron-core maps it; returns its document count.

    The .idx header (magic, version, dtype code, counts) and arrays must be whole, the .bin exactly as
    long as the index says, sequence pointers consistent with the lengths, and, given `vocab_size`,
    the first and last `sample_tokens` token ids inside the vocabulary (a wrong dtype code or a file
    of another tokenizer shows there). Any failure is a ConfigError naming the file and the fix.
    """
    from neox_zoology.config import ConfigError

    fix = f"re-run `python -m tokenization.preprocess` for {prefix}"
    try:
        index = read_index(prefix)
        lengths, pointers, docs = index.arrays()
    except IndexFileError as exc:
        raise ConfigError(f"{exc}; {fix}") from None
    idx, bin_, item, n_seq = index.idx, index.bin, index.dtype.itemsize, index.sequences
    if n_seq and ((lengths < 0).any() or (pointers != np.concatenate([[0], np.cumsum(lengths[:-1].astype(np.int64) * item)])).any()):
        raise ConfigError(f"{idx}: sequence lengths and pointers disagree: the index is corrupt; {fix}")
    if index.boundaries == 0 or docs[0] != 0 or docs[-1] != n_seq or (np.diff(docs) < 0).any():
        raise ConfigError(f"{idx}: document boundaries are not 0 ... {n_seq} in order: the index is corrupt; {fix}")
    expected = int(lengths.astype(np.int64).sum()) * item
    actual = bin_.stat().st_size
    if actual != expected:
        raise ConfigError(f"{bin_}: {actual} bytes, but {idx} describes {expected} ({expected // item} tokens of "
                          f"{index.dtype}): the pair does not belong together or the .bin is truncated; {fix}")
    if vocab_size is not None and expected:
        tokens = np.memmap(bin_, dtype=index.dtype, mode="r")
        for part in (tokens[:sample_tokens], tokens[-sample_tokens:]):
            lo, hi = int(part.min()), int(part.max())
            if lo < 0 or hi >= vocab_size:
                raise ConfigError(f"{bin_}: token ids {lo} .. {hi} fall outside the tokenizer's vocabulary of "
                                  f"{vocab_size}: the data was written with another tokenizer or dtype; {fix}")
    return index.boundaries - 1


def check_split(args) -> None:
    """Refuse a `split` that leaves a used part of `data_path` empty.

    megatron-core assigns documents [round(a*n), round(b*n)) to each split; asked for samples from an
    empty split, its epoch count never reaches the request and it loops forever.
    """
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from neox_zoology.config import ConfigError

    try:
        matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(args.split))
    except Exception as exc:  # noqa: BLE001 - any parse failure is the user's string
        raise ConfigError(f"split: {args.split!r} is not 'train,valid,test' proportions ({exc})") from None
    n = len(IndexedDataset(args.data_path, mmap=True))
    for name, part in zip(("train", "validation", "test"), matrix):
        if part is None:
            continue
        docs = int(round(part[1] * n)) - int(round(part[0] * n))
        if docs == 0:
            raise ConfigError(
                f"{args.sources.get('split', 'config')}: split {args.split!r} leaves the {name} part of "
                f"{args.data_path} with 0 of its {n} documents; give that part a larger share, or 0 "
                f"to drop it"
            )


def build_datasets(args, tokenizer, eval_runs: int) -> Splits:
    """GPTDatasets sized for `train_iters` steps, `eval_runs` evaluations of `eval_iters` batches and the
    AR-slice hook's `ar_eval.iters` batches (the same ones at every checkpoint)."""
    g = args.global_batch
    ar = args.ar_eval or {}
    valid = max(max(1, eval_runs) * args.eval_iters, int(ar.get("iters", 0)) if ar.get("enabled") else 0)
    sizes = [args.train_iters * g, valid * g, args.eval_iters * g]
    cache = args.data_cache_path or os.path.join(args.save or "runs", "data_cache")
    common = dict(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        tokenizer=DatasetTokenizer(tokenizer, data_prefixes(args)),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=False,  # every mixer is causal by construction
        path_to_cache=cache,
        mmap_bin_files=True,
    )
    for prefix in data_prefixes(args):
        check_indexed_dataset(prefix, tokenizer.vocab_size if tokenizer is not None else args.vocab_size)
    check_data_identity(args, tokenizer)
    if args.data_path:
        check_split(args)
        config = GPTDatasetConfig(blend=([args.data_path], None), split=args.split, **common)
    else:
        config = GPTDatasetConfig(
            blend_per_split=[
                _blend(args.train_data_paths, args.train_data_weights),
                _blend(args.valid_data_paths, args.valid_data_weights),
                _blend(args.test_data_paths, args.test_data_weights),
            ],
            **common,
        )
    train, valid, test = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    return Splits(train, valid, test)


class BatchIterator:
    """Yields micro-batches `(tokens, (labels, loss_mask))` of one data-parallel rank, from step `start`."""

    def __init__(self, dataset, micro_batch: int, accumulation: int, dp_rank: int, dp_size: int,
                 start_step: int = 0):
        self.dataset = dataset
        self.mb = micro_batch
        self.ga = accumulation
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.step = start_step
        self.micro = 0

    @property
    def global_batch(self) -> int:
        return self.mb * self.ga * self.dp_size

    def indices(self, step: int, micro: int) -> range:
        start = step * self.global_batch + (micro * self.dp_size + self.dp_rank) * self.mb
        return range(start, start + self.mb)

    def __iter__(self):
        return self

    def __next__(self):
        idx = [i % len(self.dataset) for i in self.indices(self.step, self.micro)]
        samples = [self.dataset[i] for i in idx]
        self.micro += 1
        if self.micro == self.ga:
            self.micro, self.step = 0, self.step + 1
        tokens = torch.stack([torch.as_tensor(s["tokens"]) for s in samples]).long()
        labels = torch.stack([torch.as_tensor(s["labels"]) for s in samples]).long()
        loss_mask = torch.stack([torch.as_tensor(s["loss_mask"]) for s in samples]).float()
        return tokens, (labels, loss_mask)


def to_device(batch, device):
    tokens, (labels, mask) = batch
    return tokens.to(device), (labels.to(device), mask.to(device))

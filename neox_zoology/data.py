"""Training/validation batches from megatron-core datasets (.bin/.idx, GPTDataset, blending).

Sample order is a pure function of the iteration: micro-batch m of data-parallel rank r at step i
holds samples  i*G + (m*DP + r)*mb ... + mb  (G = global batch, mb = micro batch). So a resumed run
continues at exactly the right sample, and DP=2 sees the same samples as DP=1 with twice the
gradient accumulation.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig


class DatasetTokenizer:
    """The few tokenizer facts megatron-core's GPTDataset reads (eod/pad ids, cache identity)."""

    def __init__(self, tokenizer):
        self.eod = tokenizer.eod
        self.pad = tokenizer.pad  # equal to eod -> megatron-core substitutes -1 (nothing is masked)
        self.vocab_size = tokenizer.vocab_size
        self.unique_identifiers = dict(tokenizer.unique_identifiers)


@dataclass
class Splits:
    train: object
    valid: object | None
    test: object | None


def _blend(paths, weights):
    if not paths:
        return None
    return (list(paths), [float(w) for w in weights] if weights else None)


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
    """GPTDatasets sized for `train_iters` steps and `eval_runs` evaluations of `eval_iters` batches."""
    g = args.global_batch
    sizes = [args.train_iters * g, max(1, eval_runs) * args.eval_iters * g, args.eval_iters * g]
    cache = args.data_cache_path or os.path.join(args.save or "runs", "data_cache")
    common = dict(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        tokenizer=DatasetTokenizer(tokenizer),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=False,  # every mixer is causal by construction
        path_to_cache=cache,
        mmap_bin_files=True,
    )
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

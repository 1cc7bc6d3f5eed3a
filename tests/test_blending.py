"""Blended training data through neox_zoology.data.build_datasets (megatron-core's
BlendedMegatronDatasetBuilder), and the Pile-format sample read the way training reads it.

Each check runs in a forked 1-rank gloo child (the builder needs a process group; the pytest parent
stays free of one).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dist import run_ranks
from test_preprocess import train_tiny_bpe

from tokenization.preprocess import array_builder_class, preprocess

RANGES = {"a": (10, 100), "b": (100, 200), "c": (200, 300)}  # disjoint token ids per dataset


def _write(prefix: Path, low: int, high: int, eod: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    docs = [np.append(rng.integers(low, high, int(rng.integers(5, 40))), eod) for _ in range(150)]
    builder = array_builder_class()(str(prefix) + ".bin", np.uint16)
    builder.add_documents(np.concatenate(docs), np.array([len(d) for d in docs]))
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


def _sources_of_samples(rank, raw, samples):
    import torch.distributed as dist

    from neox_zoology.config import build_args
    from neox_zoology.data import build_datasets
    from neox_zoology.tokenizer import build_tokenizer

    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        args = build_args(raw, world_size=1)
        tokenizer = build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file)
        splits = build_datasets(args, tokenizer, eval_runs=0)
        sources = []
        for i in range(samples):
            tokens = np.asarray(splits.train[i]["tokens"])
            body = tokens[(tokens != tokenizer.eod) & (tokens != tokenizer.pad)]
            names = {name for name, (low, high) in RANGES.items() if ((body >= low) & (body < high)).any()}
            assert len(names) == 1, f"sample {i} mixes datasets {names}"
            sources.append(names.pop())
        return {name: sources.count(name) / samples for name in RANGES}, len(splits.train)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [1, 1, 8]], ids=["normalised", "unnormalised"])
def test_train_data_paths_are_sampled_in_proportion_to_their_weights(tiny_raw, tiny_corpus, tmp_path, weights):
    from neox_zoology.tokenizer import build_tokenizer

    eod = build_tokenizer("SPMTokenizer", tiny_corpus["tokenizer"]).eod
    assert eod < min(low for low, _ in RANGES.values())
    paths = [_write(tmp_path / name, low, high, eod, seed) for seed, (name, (low, high)) in enumerate(RANGES.items())]
    samples = 2000
    raw = tiny_raw(data_path=None, train_data_paths=paths, train_data_weights=weights,
                   train_iters=samples // 2, eval_iters=0)  # global batch 2
    (fractions, length), = run_ranks(_sources_of_samples, 1, raw, samples, timeout=180)
    assert length == samples
    expected = np.array(weights, float) / sum(weights)
    for (name, got), want in zip(fractions.items(), expected):
        assert abs(got - want) <= 0.02, (name, got, want)


def _read_pile_sample(rank, raw):
    import torch.distributed as dist

    from neox_zoology.config import build_args
    from neox_zoology.data import BatchIterator, build_datasets
    from neox_zoology.tokenizer import build_tokenizer

    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        args = build_args(raw, world_size=1)
        tokenizer = build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file)
        splits = build_datasets(args, tokenizer, eval_runs=1)
        tokens, (labels, mask) = next(BatchIterator(splits.train, 2, 1, 0, 1))
        valid = [np.asarray(splits.valid[i]["tokens"]) for i in range(4)]
        train = [np.asarray(splits.train[i]["tokens"]) for i in range(8)]
        return tokens.numpy(), labels.numpy(), train, valid, len(splits.train), len(splits.valid)
    finally:
        dist.destroy_process_group()


def _pieces(sample: np.ndarray, eod: int) -> list[np.ndarray]:
    parts = (part[part != eod] for part in np.split(sample, np.flatnonzero(sample == eod)))
    return [part for part in parts if part.size]


def test_build_datasets_reads_the_preprocessed_pile_sample(tiny_raw, tmp_path):
    from tokenization.pile_sample import write_pile_sample
    from neox_zoology.tokenizer import build_tokenizer

    tiny = train_tiny_bpe(tmp_path / "bpe")
    write_pile_sample(tmp_path / "pile", mb=0.3, seed=2)
    common = dict(append_eod=True, workers=1, progress=False, max_bad_fraction=0.2)
    for split, source in (("train", tmp_path / "pile" / "train"), ("val", tmp_path / "pile" / "val.jsonl.zst")):
        preprocess([source], tmp_path / "data" / f"pile_{split}", "GPT2BPETokenizer", tiny["vocab"],
                   tiny["merges"], **common)
    train_prefix = str(tmp_path / "data" / "pile_train_text_document")
    valid_prefix = str(tmp_path / "data" / "pile_val_text_document")
    raw = tiny_raw(data_path=None, train_data_paths=[train_prefix], valid_data_paths=[valid_prefix],
                   tokenizer_type="GPT2BPETokenizer", vocab_file=tiny["vocab"], merge_file=tiny["merges"],
                   eval_iters=2, eval_interval=5)
    tokens, labels, train, valid, n_train, n_valid = run_ranks(_read_pile_sample, 1, raw, timeout=180)[0]

    tok = build_tokenizer("GPT2BPETokenizer", tiny["vocab"], tiny["merges"])
    assert tokens.shape == labels.shape == (2, 32) and (tokens[:, 1:] == labels[:, :-1]).all()
    assert n_train >= 5 * 2 and n_valid >= 2 * 2  # one dataset per split: megatron-core keeps whole epochs
    for prefix, samples in ((train_prefix, train), (valid_prefix, valid)):
        stream = np.fromfile(prefix + ".bin", np.uint16)
        data = stream.tobytes()
        for sample in samples:
            assert sample.shape == (32,) and sample.max() < tok.vocab_size
            for piece in _pieces(sample, tok.eod):  # every run between eods lies inside one document
                at = data.find(piece.astype(np.uint16).tobytes())
                while at >= 0 and at % 2:  # token-aligned matches only
                    at = data.find(piece.astype(np.uint16).tobytes(), at + 1)
                assert at >= 0, f"a sample piece of {prefix} is not in its .bin"

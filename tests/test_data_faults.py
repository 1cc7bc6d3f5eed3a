"""Corrupt .bin/.idx pairs are refused with the file named, before megatron-core maps them."""
import shutil
import struct

import numpy as np
import pytest

from neox_zoology.config import ConfigError
from neox_zoology.data import check_indexed_dataset


@pytest.fixture
def pair(tiny_corpus, tmp_path):
    prefix = str(tmp_path / "copy_text_document")
    for ext in (".bin", ".idx"):
        shutil.copy(tiny_corpus["data_prefix"] + ext, prefix + ext)
    return prefix


def test_a_whole_pair_passes_and_counts_documents(pair):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert check_indexed_dataset(pair, vocab_size=512) == len(IndexedDataset(pair, mmap=True).document_indices) - 1


def _header(prefix):
    raw = open(prefix + ".idx", "rb").read()
    return raw, struct.unpack("<QBQQ", raw[9:34])


@pytest.mark.parametrize("fault,message", [
    ("truncate_bin", r"\.bin: \d+ bytes, but .*\.idx describes \d+ .* the \.bin is truncated"),
    ("extend_bin", r"\.bin: \d+ bytes, but .*\.idx describes"),
    ("truncate_idx", r"\.idx: \d+ bytes, but its header .* truncated or corrupt"),
    ("bad_magic", r"\.idx: not a megatron index"),
    ("float_dtype", r"\.idx: dtype code 7 cannot hold token ids"),
    ("wrong_dtype", r"\.idx: sequence lengths and pointers disagree|\.bin: \d+ bytes, but"),
    ("other_vocab", r"token ids \d+ \.\. \d+ fall outside the tokenizer's vocabulary of 100"),
])
def test_corruptions_are_clear_errors(pair, fault, message):
    raw, (version, code, n_seq, n_doc) = _header(pair)
    vocab = 512
    if fault == "truncate_bin":
        data = open(pair + ".bin", "rb").read()
        open(pair + ".bin", "wb").write(data[: len(data) // 2])
    elif fault == "extend_bin":
        open(pair + ".bin", "ab").write(b"\0" * 6)
    elif fault == "truncate_idx":
        open(pair + ".idx", "wb").write(raw[:-5])
    elif fault == "bad_magic":
        open(pair + ".idx", "wb").write(b"XXXXXXXXX" + raw[9:])
    elif fault in ("float_dtype", "wrong_dtype"):
        new = 7 if fault == "float_dtype" else (4 if code == 8 else 8)  # uint16 <-> int32
        open(pair + ".idx", "wb").write(raw[:17] + bytes([new]) + raw[18:])
    elif fault == "other_vocab":
        vocab = 100
    with pytest.raises(ConfigError, match=message):
        check_indexed_dataset(pair, vocab_size=vocab)


def test_random_byte_flips_in_the_index_never_pass_silently_or_crash_otherwise(pair):
    raw = open(pair + ".idx", "rb").read()
    rng = np.random.default_rng(0)
    outcomes = {"error": 0, "passed": 0}
    for _ in range(200):
        buf = bytearray(raw)
        for pos in rng.integers(0, len(buf), size=3):
            buf[pos] ^= 1 << int(rng.integers(0, 8))
        open(pair + ".idx", "wb").write(bytes(buf))
        try:
            check_indexed_dataset(pair, vocab_size=512)
            outcomes["passed"] += 1
            # a flip that passes may only have touched bytes that cannot change what is read: none exist
            # in the header or the arrays, so a pass means the flips cancelled out
            assert bytes(buf) == raw
        except ConfigError:
            outcomes["error"] += 1
    assert outcomes["error"] >= 199

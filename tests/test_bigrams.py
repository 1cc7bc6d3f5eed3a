"""tokenization.bigrams: training counts of evaluation bigrams, the counts file and its checks."""
from __future__ import annotations

import json
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from test_preprocess import train_tiny_bpe

from tokenization import bigrams as bg
from tokenization import bigrams_file
from tokenization.bigrams import (
    BigramCounter,
    BigramCounts,
    BigramCountsError,
    Documents,
    count_bigrams,
    dataset_info,
    load_bigram_counts,
    lookup,
    lookup_keys,
    save_bigram_counts,
    split_documents,
)
from neox_zoology.tokenizer import tokenizer_identity
from tokenization.preprocess import array_builder_class, preprocess
from neox_zoology.tokenizer import build_tokenizer


def write_dataset(prefix: Path, documents: list[np.ndarray], dtype=np.uint16) -> str:
    builder = array_builder_class()(str(prefix) + ".bin", dtype)
    if documents:
        builder.add_documents(np.concatenate(documents), np.array([len(d) for d in documents]))
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


def random_documents(rng, n_docs: int, vocab: int, max_len: int = 60, zipf: bool = True) -> list[np.ndarray]:
    docs = []
    for _ in range(n_docs):
        length = int(rng.integers(1, max_len))
        ids = (rng.zipf(1.3, length) - 1) % vocab if zipf else rng.integers(0, vocab, length)
        docs.append(ids.astype(np.int64))
    return docs


def stream_pairs(prefixes: list[str], limit: int | None = None) -> Counter:
    """Reference: adjacent pairs of each prefix's token stream, within the first `limit` tokens."""
    pairs, left = Counter(), limit
    for prefix in prefixes:
        tokens = np.fromfile(prefix + ".bin", np.uint16).tolist()
        if left is not None:
            tokens, left = tokens[:left], left - len(tokens[:left])
        pairs.update(zip(tokens, tokens[1:]))
    return pairs


IDENTITY = {"type": "Synthetic", "vocab_size": 97, "eod": 96, "files": {"vocab_file": "sha256:00"}}


@pytest.fixture
def synthetic(tmp_path):
    rng = np.random.default_rng(0)
    train = [write_dataset(tmp_path / f"train{i}", random_documents(rng, 80, 97)) for i in range(2)]
    evals = [write_dataset(tmp_path / "eval", random_documents(rng, 30, 97))]
    return train, evals


# --------------------------------------------------------------------------------- counting


@pytest.mark.parametrize("chunk_tokens", [5, 64, 1 << 17])
def test_counts_equal_a_plain_pair_count_across_chunks_and_prefixes(synthetic, chunk_tokens):
    train, evals = synthetic
    result = count_bigrams(train, evals, tokenizer=IDENTITY, chunk_tokens=chunk_tokens)
    reference = stream_pairs(train)
    eval_pairs = stream_pairs(evals)
    assert result.keys.tolist() == sorted(a * 97 + b for a, b in eval_pairs)
    assert result.counts.tolist() == [reference[(int(k) // 97, int(k) % 97)] for k in result.keys]
    assert result.eval_counts.tolist() == [eval_pairs[(int(k) // 97, int(k) % 97)] for k in result.keys]
    assert result.train_tokens == result.train_available == sum(dataset_info(p).tokens for p in train)
    assert (result.counts > 0).any() and (result.counts == 0).any()  # both kinds are exercised


def test_max_train_tokens_counts_only_the_first_tokens_across_prefixes(synthetic):
    train, evals = synthetic
    first = dataset_info(train[0]).tokens
    for limit in (first // 2, first + 7):
        result = count_bigrams(train, evals, tokenizer=IDENTITY, max_train_tokens=limit, chunk_tokens=16)
        reference = stream_pairs(train, limit)
        assert result.counts.tolist() == [reference[(int(k) // 97, int(k) % 97)] for k in result.keys]
        assert result.train_tokens == limit and result.max_train_tokens == limit


def test_colliding_keys_go_to_the_overflow_list_and_still_count_exactly():
    rng = np.random.default_rng(1)
    vocab = 1000
    keys = np.unique(rng.integers(0, vocab * vocab, 5000))
    priority = rng.integers(1, 100, keys.size)
    counter = BigramCounter(keys, vocab, priority=priority, extra_bits=-2)  # 4 keys per slot on average
    assert counter._overflow.size > keys.size // 2
    # queries: keys (some many times), and non-keys that land on flagged slots
    queries = np.concatenate([rng.choice(keys, 20000), rng.integers(0, vocab * vocab, 20000)])
    for part in np.array_split(queries, 7):
        counter.update(part)
    reference = Counter(queries.tolist())
    assert counter.counts().tolist() == [reference[int(k)] for k in keys]
    # the most frequent key of a crowded slot keeps the table entry
    slots = counter._slots(keys)
    crowded = np.flatnonzero(slots == np.bincount(slots).argmax())
    assert counter._winners[counter._winner_slots == slots[crowded[0]]][0] == crowded[np.argmax(priority[crowded])]


def test_uint32_slot_counts_are_folded_into_int64(monkeypatch):
    keys = np.array([3, 10, 500], np.int64)
    counter = BigramCounter(keys, 100)
    monkeypatch.setattr(counter, "FOLD_AT", 8)
    for _ in range(10):
        counter.update(np.array([3, 3, 10, 7], np.int64))
    assert counter._slot_totals is not None  # folded at least once
    assert counter.counts().tolist() == [20, 10, 0]


def test_memory_does_not_grow_with_the_training_data(tmp_path):
    rng = np.random.default_rng(2)
    evals = [write_dataset(tmp_path / "eval", random_documents(rng, 200, 5000, zipf=False))]
    peaks, sizes = [], []
    for n_docs in (2_000, 16_000):  # 8x the training tokens
        train = [write_dataset(tmp_path / f"train{n_docs}", random_documents(rng, n_docs, 5000, max_len=120))]
        identity = {**IDENTITY, "vocab_size": 5000}
        tracemalloc.start()  # numpy reports its allocations to tracemalloc
        count_bigrams(train, evals, tokenizer=identity, chunk_tokens=4096)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        sizes.append(Path(train[0] + ".bin").stat().st_size)
    assert peaks[1] < 1.2 * peaks[0]
    assert peaks[1] < sizes[1] / 2  # far less than the training data itself


# ------------------------------------------------------------------- training split (data_path + split)


def megatron_split(n: int, split: str) -> list[tuple[int, int] | None]:
    """megatron-core's own document ranges per part, as BlendedMegatronDatasetBuilder computes them."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    return [None if part is None else (int(round(part[0] * float(n))), int(round(part[1] * float(n))))
            for part in convert_split_vector_to_split_matrix(parse_and_normalize_split(split))]


def test_split_documents_are_megatron_cores_document_ranges(tmp_path):
    rng = np.random.default_rng(5)
    for n in (1, 7, 50, 568, 1001):
        prefix = write_dataset(tmp_path / f"d{n}", random_documents(rng, n, 97, max_len=4))
        for split in ("980,20,0", "969,30,1", "90,10,0", "1,1,1", "100,0,0", "0.7,0.2,0.1", "3,1", "2"):
            parts = split_documents(prefix, split)
            got = [None if d is None else (d.start, d.stop) for d in parts]
            assert got == megatron_split(n, split), (n, split)
            assert all(d is None or d.prefix == prefix for d in parts)
    with pytest.raises(BigramCountsError, match=r"split '0,0,0': give up to three proportions"):
        split_documents(prefix, "0,0,0")
    with pytest.raises(BigramCountsError, match=r"split '1,2,3,4'"):
        split_documents(prefix, "1,2,3,4")


def test_dataset_info_of_a_document_range_agrees_with_megatron(synthetic):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = synthetic[0][0]
    reference = IndexedDataset(prefix, mmap=True)
    tokens = np.fromfile(prefix + ".bin", np.uint16)
    for start, stop in ((0, 80), (0, 0), (3, 17), (79, 80), (80, 80), (12, None)):
        info = dataset_info(Documents(prefix, start, stop))
        end = len(reference) if stop is None else stop
        assert info.tokens == int(reference.sequence_lengths[start:end].sum())
        assert info.documents == (start, end) and info.sequences == len(reference)
        chunks = [c.copy() for c in bg.token_chunks(info, 7)]
        stream = np.concatenate([chunks[0]] + [c[1:] for c in chunks[1:]]) if chunks else np.zeros(0)
        expected = [t for i in range(start, end) for t in reference[i].tolist()]
        assert stream.tolist() == expected == tokens[info.first_token:info.first_token + info.tokens].tolist()
    with pytest.raises(BigramCountsError, match=r"train0: documents \[5, 81\) are not within its 80 documents"):
        dataset_info(Documents(prefix, 5, 81))
    with pytest.raises(BigramCountsError, match=r"documents \[9, 3\)"):
        dataset_info(prefix, (9, 3))


def test_training_split_counts_equal_a_plain_count_over_exactly_the_training_documents(tmp_path):
    """The demo's counting: data_path + split, training documents counted, validation bigrams as keys."""
    rng = np.random.default_rng(3)
    eod = 96
    docs = [np.append(d, eod) for d in random_documents(rng, 49, 96)]  # each document ends in eod
    # the pair across the train/validation edge, (eod, 95), is frequent in the validation documents
    # and occurs nowhere in the training documents: counting it would show
    docs = [np.where(d == 95, 94, d) for d in docs]
    docs.append(np.array([95, eod, 95, eod, 95, 3, eod]))
    prefix = write_dataset(tmp_path / "data", docs)
    split = "980,20,0"
    train, valid, test = split_documents(prefix, split)
    assert (train.start, train.stop, valid.start, valid.stop, test) == (0, 49, 49, 50, None)

    result = count_bigrams([train], [valid], tokenizer=IDENTITY, chunk_tokens=13)
    train_tokens = np.concatenate(docs[:49]).tolist()  # the training documents' tokens, in file order
    valid_tokens = docs[49].tolist()
    reference = Counter(zip(train_tokens, train_tokens[1:]))
    valid_pairs = Counter(zip(valid_tokens, valid_tokens[1:]))
    assert result.keys.tolist() == sorted(a * 97 + b for a, b in valid_pairs)
    assert result.counts.tolist() == [reference[(int(k) // 97, int(k) % 97)] for k in result.keys]
    assert result.eval_counts.tolist() == [valid_pairs[(int(k) // 97, int(k) % 97)] for k in result.keys]
    assert lookup(result, [eod], [95]).tolist() == [0]  # the edge pair was not counted as training data
    assert result.train_tokens == result.train_available == len(train_tokens)
    assert result.eval_tokens == len(valid_tokens)
    assert result.train_parts == [train] and result.eval_parts == [valid]
    assert result.counts.sum() > 0 and str(valid) == f"{prefix} documents [49, 50)"

    # the whole dataset counts the edge pair once, besides the validation document's own two:
    # the range is what keeps them out
    whole = count_bigrams([prefix], [valid], tokenizer=IDENTITY)
    assert valid_pairs[(eod, 95)] == 2 and lookup(whole, [eod], [95]).tolist() == [1 + 2]
    # a budget counts the first tokens of the training documents only
    budget = count_bigrams([train], [valid], tokenizer=IDENTITY, max_train_tokens=100)
    short = Counter(zip(train_tokens[:100], train_tokens[1:100]))
    assert budget.counts.tolist() == [short[(int(k) // 97, int(k) % 97)] for k in budget.keys]


def test_command_line_split_counts_the_training_documents_for_the_validation_bigrams(tmp_path, capsys):
    rng = np.random.default_rng(4)
    prefix = write_dataset(tmp_path / "data", random_documents(rng, 60, 97))
    (tmp_path / "data.json").write_text(json.dumps({"tokenizer": IDENTITY}))
    out = tmp_path / "counts.npz"
    bg.main(["--train-prefix", prefix, "--split", "90,10,0", "--out", str(out), "--no-progress"])
    assert f"{prefix} documents [54, 60)" in capsys.readouterr().out
    train, valid, _ = split_documents(prefix, "90,10,0")
    loaded = load_bigram_counts(out, 97, IDENTITY)
    expected = count_bigrams([train], [valid])
    assert np.array_equal(loaded.keys, expected.keys) and np.array_equal(loaded.counts, expected.counts)
    assert loaded.train_parts == [train] and loaded.eval_parts == [valid]
    assert loaded.train_documents == [(0, 54)] and loaded.eval_documents == [(54, 60)]
    with pytest.raises(SystemExit, match=r"split '100,0,0' gives .*data no validation documents"):
        bg.main(["--train-prefix", prefix, "--split", "100,0,0", "--out", str(out)])
    with pytest.raises(SystemExit, match=r"give --eval-prefix \(or --split"):
        bg.main(["--train-prefix", prefix, "--out", str(out)])


def test_token_chunks_reuse_one_buffer_and_overlap_by_one_token(synthetic):
    info = dataset_info(synthetic[0][0])
    chunks = bg.token_chunks(info, 10)
    first = next(chunks).copy()
    second_view = next(chunks)
    tokens = np.fromfile(info.prefix + ".bin", np.uint16)
    assert first.tolist() == tokens[:10].tolist() and second_view.tolist() == tokens[9:20].tolist()
    assert np.shares_memory(second_view, next(chunks))


# ------------------------------------------------------------------------------ data checks


def test_dataset_info_agrees_with_megatron(synthetic, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for prefix in synthetic[0] + [write_dataset(tmp_path / "wide", [np.arange(70000)], np.int32)]:
        info = dataset_info(prefix)
        reference = IndexedDataset(prefix, mmap=True)
        assert info.dtype == reference.index.dtype
        assert info.tokens == int(reference.sequence_lengths.sum()) and info.sequences == len(reference)


def test_a_bin_that_does_not_match_its_idx_is_refused(synthetic):
    prefix = synthetic[0][0]
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(f.seek(0, 2) - 2)
    with pytest.raises(BigramCountsError, match=r"train0\.bin has \d+ bytes but its \.idx describes \d+"):
        dataset_info(prefix)
    with pytest.raises(BigramCountsError, match=r"nothing\.idx not found: give the dataset prefix"):
        dataset_info(prefix + "nothing")


def test_token_ids_beyond_the_vocabulary_are_refused(synthetic):
    train, evals = synthetic
    with pytest.raises(BigramCountsError, match=r"eval\.bin: token \d+ near token \d+ is not below vocab_size 50"):
        count_bigrams(train, evals, tokenizer={**IDENTITY, "vocab_size": 50})


def test_tokenizer_records_decide_and_must_agree(tmp_path):
    tiny = train_tiny_bpe(tmp_path / "bpe")
    other = train_tiny_bpe(tmp_path / "bpe_other", vocab_size=350)
    src = tmp_path / "a.jsonl"
    src.write_text("\n".join(json.dumps({"text": f"some text number {i}"}) for i in range(20)) + "\n")
    kw = dict(append_eod=True, workers=1, progress=False)
    preprocess([src], tmp_path / "train", "GPT2BPETokenizer", tiny["vocab"], tiny["merges"], **kw)
    preprocess([src], tmp_path / "val", "GPT2BPETokenizer", tiny["vocab"], tiny["merges"], **kw)
    preprocess([src], tmp_path / "val_other", "HFTokenizer", other["json"], **kw)
    train, val = str(tmp_path / "train_text_document"), str(tmp_path / "val_text_document")
    expected = tokenizer_identity(build_tokenizer("GPT2BPETokenizer", tiny["vocab"], tiny["merges"]))

    assert count_bigrams([train], [val]).tokenizer == expected  # from the records
    with pytest.raises(BigramCountsError, match=r"val_other_text_document was tokenized by HFTokenizer:\w+ but"):
        count_bigrams([train], [str(tmp_path / "val_other_text_document")])
    with pytest.raises(BigramCountsError, match=r"but the given tokenizer is Synthetic"):
        count_bigrams([train], [val], tokenizer=IDENTITY)
    (tmp_path / "val_text_document.json").unlink()
    (tmp_path / "train_text_document.json").unlink()
    with pytest.raises(BigramCountsError, match=r"no tokenizer record .*train_text_document\.json .* --tokenizer-type"):
        count_bigrams([train], [val])
    assert count_bigrams([train], [val], tokenizer=expected).tokenizer == expected


# ------------------------------------------------------------------------------- the file


@pytest.fixture
def counts_file(synthetic, tmp_path):
    result = count_bigrams(*synthetic, tokenizer=IDENTITY, max_train_tokens=500)
    path = tmp_path / "counts.npz"
    save_bigram_counts(path, result)
    return path, result


def test_counts_file_round_trips_with_documented_fields(counts_file):
    path, result = counts_file
    with np.load(path, allow_pickle=False) as raw:
        assert set(raw.files) == set(bigrams_file.FIELDS) | set(bigrams_file.OPTIONAL_FIELDS)
        assert raw["train_documents"].tolist() == [[0, 80], [0, 80]] and raw["eval_documents"].tolist() == [[0, 30]]
        assert raw["keys"].dtype == raw["counts"].dtype == np.int64
        assert str(raw["format"]) == "neox_zoology.bigram_counts/1"
        assert json.loads(str(raw["tokenizer"])) == IDENTITY
    loaded = load_bigram_counts(path, expected_vocab_size=97, expected_tokenizer=IDENTITY)
    assert np.array_equal(loaded.keys, result.keys) and np.array_equal(loaded.counts, result.counts)
    assert (loaded.vocab_size, loaded.train_tokens, loaded.max_train_tokens) == (97, 500, 500)
    assert loaded.train_prefixes == result.train_prefixes and loaded.tokenizer_id.startswith("Synthetic:")
    assert list(path.parent.glob("*.partial-*")) == []


def test_a_file_without_document_ranges_counted_whole_datasets(counts_file, tmp_path):
    path, result = counts_file
    with np.load(path, allow_pickle=False) as raw:
        fields = {name: raw[name] for name in raw.files if name not in bigrams_file.OPTIONAL_FIELDS}
    np.savez(tmp_path / "older.npz", **fields)
    older = load_bigram_counts(tmp_path / "older.npz", 97, IDENTITY)
    assert older.train_documents is None and older.train_parts == [Documents(p) for p in result.train_prefixes]
    assert np.array_equal(older.counts, result.counts)
    np.savez(tmp_path / "bad.npz", **fields, train_documents=np.array([[0, 80]]), eval_documents=np.array([[0, 30]]))
    with pytest.raises(BigramCountsError, match=r"train_documents must be one \[start, stop\) int64 pair per entry"):
        load_bigram_counts(tmp_path / "bad.npz")


def test_counts_from_arrays_save_load_and_lookup_keys(tmp_path):
    counts = BigramCounts.from_arrays([3 * 10 + 4, 1 * 10 + 2], [7, 0], 10)
    assert counts.keys.tolist() == [12, 34] and counts.counts.tolist() == [0, 7]
    save_bigram_counts(tmp_path / "c.npz", counts)
    loaded = load_bigram_counts(tmp_path / "c.npz", 10)
    found_counts, found = lookup_keys(loaded, np.array([[34, 12], [35, 0]]))
    assert found_counts.tolist() == [[7, 0], [0, 0]] and found.tolist() == [[True, True], [False, False]]
    assert loaded.train_parts == [] and loaded.tokenizer_id.startswith("unspecified:")
    with pytest.raises(BigramCountsError, match="keys must be distinct bigrams"):
        BigramCounts.from_arrays([5, 5], [1, 1], 10)
    with pytest.raises(BigramCountsError, match="keys must be distinct bigrams"):
        BigramCounts.from_arrays([100], [1], 10)


def test_lookup_is_vectorised_and_refuses_unknown_pairs(counts_file):
    path, result = counts_file
    counts = load_bigram_counts(path)
    a, b = result.keys // 97, result.keys % 97
    assert lookup(counts, a, b).tolist() == result.counts.tolist()
    grid = lookup(counts, a[:3, None], b[None, :4])  # broadcasting
    assert grid.shape == (3, 4) and grid.dtype == np.int64
    assert grid[1, 1] == result.counts[1]
    unknown = next(k for k in range(97 * 97) if k not in set(result.keys.tolist()))
    first = rf"\(first: \({unknown // 97}, {unknown % 97}\)\)"
    with pytest.raises(BigramCountsError, match=rf"1 of 2 bigrams are not in .*counts\.npz {first}"):
        lookup(counts, [a[0], unknown // 97], [b[0], unknown % 97])
    assert lookup(counts, [unknown // 97], [unknown % 97], missing=-1).tolist() == [-1]
    assert counts.lookup(a[:2], b[:2]).tolist() == result.counts[:2].tolist()
    with pytest.raises(BigramCountsError, match=r"token id 97 in b is outside the vocabulary \[0, 97\)"):
        lookup(counts, [1], [97])
    with pytest.raises(BigramCountsError, match="integer token ids"):
        lookup(counts, [1.0], [2.0])


def test_a_mismatched_or_broken_file_gives_a_clear_error(counts_file, tmp_path):
    path, _ = counts_file
    expected = (r"counts bigrams of a 97-token vocabulary \(Synthetic:\w+\) but vocab_size 50304 was "
                r"expected; pass the tokenizer's vocab_size \(not the padded")
    with pytest.raises(BigramCountsError, match=expected):
        load_bigram_counts(path, expected_vocab_size=50304)
    other = {**IDENTITY, "files": {"vocab_file": "sha256:11"}}
    with pytest.raises(BigramCountsError,
                       match=r"counted on data tokenized by Synthetic:\w+ .* but the evaluation uses Synthetic:\w+"):
        load_bigram_counts(path, expected_tokenizer=other)
    assert load_bigram_counts(path, expected_tokenizer=bg.identity_id(IDENTITY)).tokenizer == IDENTITY
    with pytest.raises(BigramCountsError, match=r"but the evaluation expects 'Synthetic:0123'"):
        load_bigram_counts(path, expected_tokenizer="Synthetic:0123")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(BigramCountsError, match=r"junk\.npz is not a bigram counts file"):
        load_bigram_counts(tmp_path / "junk.npz")
    np.savez(tmp_path / "partial.npz", keys=np.arange(3))
    with pytest.raises(BigramCountsError, match=r"partial\.npz lacks format, counts"):
        load_bigram_counts(tmp_path / "partial.npz")
    with pytest.raises(BigramCountsError, match=r"nope\.npz not found"):
        load_bigram_counts(tmp_path / "nope.npz")


def test_expected_tokenizer_may_be_a_tokenizer_object(tmp_path):
    tiny = train_tiny_bpe(tmp_path / "bpe")
    tok = build_tokenizer("GPT2BPETokenizer", tiny["vocab"], tiny["merges"])
    prefix = write_dataset(tmp_path / "d", [np.array([1, 2, 3, 1, 2], np.int64)])
    identity = tokenizer_identity(tok)
    save_bigram_counts(tmp_path / "c.npz", count_bigrams([prefix], [prefix], tokenizer=identity))
    assert load_bigram_counts(tmp_path / "c.npz", tok.vocab_size, tok).tokenizer == identity
    (Path(tiny["merges"])).write_text(Path(tiny["merges"]).read_text() + "\n")  # another file now
    with pytest.raises(BigramCountsError, match="counted on data tokenized by GPT2BPETokenizer"):
        load_bigram_counts(tmp_path / "c.npz", tok.vocab_size, tok)


# --------------------------------------------------------------------- the Pile-format sample


def test_pile_sample_goes_through_preprocess_and_bigram_counts(tmp_path, capsys):
    from tokenization.pile_sample import write_pile_sample

    tiny = train_tiny_bpe(tmp_path / "bpe")
    manifest = write_pile_sample(tmp_path / "pile", mb=0.3, seed=1)
    common = dict(append_eod=True, workers=1, progress=False, max_bad_fraction=0.2)
    train = preprocess([tmp_path / "pile" / "train"], tmp_path / "data" / "pile_train", "GPT2BPETokenizer",
                       tiny["vocab"], tiny["merges"], **common)
    preprocess([tmp_path / "pile" / "val.jsonl.zst"], tmp_path / "data" / "pile_val", "GPT2BPETokenizer",
               tiny["vocab"], tiny["merges"], **common)

    # every planted bad line, and nothing else, is reported at its file and line
    report = json.loads((tmp_path / "data" / "pile_train_report.json").read_text())
    got = sorted((Path(s["file"]).relative_to(tmp_path / "pile").as_posix(), s["line"], s["reason"])
                 for s in report["skipped_lines"])
    planted = sorted((p["file"], p["line"], p["reason"]) for p in manifest["planted"])
    assert got == planted and {r for _, _, r in planted} >= {"invalid_json", "missing_key", "not_a_string",
                                                              "invalid_utf8", "empty", "not_an_object",
                                                              "truncated_zst"}
    train_parts = {k: v for k, v in manifest["documents"].items() if k.startswith("train/")}
    assert train["documents"] == sum(v["documents"] for v in train_parts.values())
    for name in ("python-stdlib", "python-docs"):
        assert train["pile_set_names"][name]["documents"] == sum(v["per_set"][name] for v in train_parts.values())

    out = tmp_path / "counts.npz"
    bg.main(["--train-prefix", str(tmp_path / "data" / "pile_train_text_document"), "--eval-prefix",
             str(tmp_path / "data" / "pile_val_text_document"), "--out", str(out), "--no-progress"])
    assert "distinct evaluation bigrams" in capsys.readouterr().out
    tok = build_tokenizer("GPT2BPETokenizer", tiny["vocab"], tiny["merges"])
    counts = load_bigram_counts(out, tok.vocab_size, tok)
    reference = stream_pairs([str(tmp_path / "data" / "pile_train_text_document")])
    val = np.fromfile(str(tmp_path / "data" / "pile_val_text_document.bin"), np.uint16).astype(np.int64)
    pairs = zip(val[:-1].tolist(), val[1:].tolist())
    assert lookup(counts, val[:-1], val[1:]).tolist() == [reference[pair] for pair in pairs]
    assert counts.train_tokens == train["tokens"]


def test_command_line_errors_exit_with_the_message(tmp_path):
    with pytest.raises(SystemExit, match=r"bigrams: error: .*missing\.idx not found"):
        bg.main(["--train-prefix", str(tmp_path / "missing"), "--eval-prefix", str(tmp_path / "missing"),
                 "--out", str(tmp_path / "c.npz")])
    with pytest.raises(SystemExit, match=r"bigrams: error: unknown tokenizer_type 'GPT2BPETokenizr': did you mean"):
        bg.main(["--train-prefix", "x", "--eval-prefix", "y", "--out", str(tmp_path / "c.npz"),
                 "--tokenizer-type", "GPT2BPETokenizr", "--vocab-file", "v.json"])

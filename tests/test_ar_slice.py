"""AR-slice masks, sums, gap attribution, the bigram-count file and the ar_eval config section."""
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from eval import ar_slice
from eval.ar_slice import ARSliceError, SliceSums, token_slices
from tokenization import bigrams
from tokenization.bigrams import BigramCounts

V = 50


def counts_of(pairs: dict, vocab=V) -> BigramCounts:
    keys = [a * vocab + b for a, b in pairs]
    return BigramCounts.from_arrays(keys, list(pairs.values()), vocab)


def split(seq):
    seq = np.asarray(seq)[None]
    return seq[:, :-1], seq[:, 1:]


def reference_slices(seq, counts: BigramCounts, threshold):
    """Plain loops: label t is seq[t+1]; hit if (seq[t], seq[t+1]) ended at an earlier label, count <= threshold."""
    hits, dist = [], []
    for t in range(len(seq) - 1):
        bigram = (seq[t], seq[t + 1])
        earlier = [j for j in range(t) if (seq[j], seq[j + 1]) == bigram]
        c = int(counts.lookup(np.array([bigram[0]]), np.array([bigram[1]]), missing=0)[0])
        hits.append(bool(earlier) and c <= threshold)
        dist.append(t - earlier[-1] if earlier else 0)
    return np.array(hits), np.array(dist)


def test_crafted_sequence_marks_exactly_the_repeated_rare_bigrams():
    #        0  1  2  3  4  5  6  7  8  9 10 11 12
    seq = [7, 8, 9, 7, 8, 3, 7, 8, 9, 1, 2, 1, 2]
    counts = counts_of({(7, 8): 5, (8, 9): 2000, (1, 2): 1250})
    s = token_slices(*split(seq), counts, threshold=1250)
    # label t predicts seq[t+1]; (7,8) ends at labels 0, 3, 6 -> hits at 3 and 6 (first occurrence never);
    # (8,9) ends at labels 1, 7 but is frequent in training (2000 > 1250) -> repeated, not a hit;
    # (1,2) ends at labels 9 and 11, count exactly at the threshold -> hit at 11.
    expected = np.zeros(12, dtype=bool)
    expected[[3, 6, 11]] = True
    assert s.ar_hit[0].tolist() == expected.tolist()
    assert np.flatnonzero(s.repeated[0]).tolist() == [3, 6, 7, 11]
    assert s.distance[0, 3] == 3 and s.distance[0, 6] == 3 and s.distance[0, 7] == 6 and s.distance[0, 11] == 2
    assert s.train_count[0, 1] == 2000 and s.train_count[0, 4] == 0


def test_threshold_edges():
    seq = [4, 5, 4, 5]
    for count, threshold, hit in [(10, 10, True), (11, 10, False), (0, 0, True), (1, 0, False)]:
        s = token_slices(*split(seq), counts_of({(4, 5): count}), threshold=threshold)
        assert s.ar_hit[0].tolist() == [False, False, hit], (count, threshold)


def test_first_occurrences_are_never_hits_and_unseen_bigrams_count_zero():
    seq = np.arange(20) % V  # every bigram distinct
    s = token_slices(*split(seq), counts_of({}), threshold=10**9)
    assert not s.ar_hit.any() and not s.repeated.any() and (s.train_count == 0).all()


def test_vectorised_masks_match_plain_loops_on_random_batches():
    rng = np.random.default_rng(0)
    counts = counts_of({(a, b): int(rng.integers(0, 40)) for a in range(6) for b in range(6)})
    batch = rng.integers(0, 6, size=(5, 61))
    s = token_slices(batch[:, :-1], batch[:, 1:], counts, threshold=20)
    for row in range(5):
        hits, dist = reference_slices(batch[row].tolist(), counts, 20)
        assert s.ar_hit[row].tolist() == hits.tolist()
        assert s.distance[row][s.repeated[row]].tolist() == dist[dist > 0].tolist()


def test_masks_are_causal():
    rng = np.random.default_rng(1)
    counts = counts_of({})
    seq = rng.integers(0, 4, size=40)
    base = token_slices(*split(seq), counts, threshold=5)
    for t in range(39):
        changed = seq.copy()
        changed[t + 2:] = rng.integers(0, 4, size=len(changed) - t - 2)  # everything after label t
        other = token_slices(*split(changed), counts, threshold=5)
        assert base.ar_hit[0, : t + 1].tolist() == other.ar_hit[0, : t + 1].tolist()


def test_slice_sums_add_up_and_respect_the_loss_mask():
    rng = np.random.default_rng(2)
    counts = counts_of({(a, b): int(rng.integers(0, 3000)) for a in range(8) for b in range(8)})
    batch = rng.integers(0, 8, size=(4, 33))
    s = token_slices(batch[:, :-1], batch[:, 1:], counts, threshold=1250)
    nll = rng.random((4, 32)) * 5
    mask = np.ones((4, 32))
    mask[0, :5] = 0
    sums = SliceSums()
    sums.add(nll, s, mask)
    assert sums.n[0] == mask.sum()
    assert sums.nll[0] == pytest.approx((nll * mask).sum())
    assert sums.nll[1] + sums.nll[2] == pytest.approx(sums.nll[0])
    assert sums.n[1] + sums.n[2] == sums.n[0]
    assert sums.nll[1] == pytest.approx((nll * mask * s.ar_hit).sum())
    assert sums.freq_nll.sum() == pytest.approx(sums.nll[0]) and sums.freq_n.sum() == sums.n[0]
    assert sums.freq_nll[0].sum() == pytest.approx(sums.nll[1])
    assert sums.dist_nll.sum() == pytest.approx(sums.nll[1]) and sums.dist_n.sum() == sums.n[1]
    doc = ar_slice.summarize(sums, 1250)
    assert doc["all"]["ppl"] == pytest.approx(math.exp((nll * mask).sum() / mask.sum()))
    assert doc["ar_hit_fraction"] == pytest.approx(sums.n[1] / sums.n[0])
    # the vector form round-trips (it is what ranks all-reduce)
    again = SliceSums.from_vector(sums.vector())
    assert np.array_equal(again.vector(), sums.vector())


def test_frequency_and_distance_buckets_are_log2():
    assert ar_slice.freq_bucket(np.array([0, 1, 2, 3, 4, 7, 8, 1250])).tolist() == [0, 1, 2, 2, 3, 3, 4, 11]
    assert ar_slice.dist_bucket(np.array([1, 2, 3, 4, 100])).tolist() == [0, 1, 1, 2, 6]
    assert ar_slice.freq_bucket_range(11) == (1024, 2047)


# ----------------------------------------------------------------------------- gap attribution


def doc(ppl_all, ppl_ar, rho=0.064):
    return {"all": {"nll": math.log(ppl_all), "ppl": ppl_all}, "ar_hits": {"nll": math.log(ppl_ar), "ppl": ppl_ar},
            "ar_hit_fraction": rho}


def test_gap_attribution_formula_on_table_1_numbers():
    attention, hyena = doc(9.44, 1.98), doc(10.07, 3.83)  # Table 1, 360M
    g = ar_slice.gap_attribution(hyena, attention)
    expected = 0.064 * (math.log(3.83) - math.log(1.98)) / (math.log(10.07) - math.log(9.44))
    assert g["share"] == pytest.approx(expected) and 0.6 < g["share"] < 0.7
    assert g["case"] == "formula"


def test_gap_attribution_sign_conventions():
    attention = doc(9.44, 1.98)
    assert ar_slice.gap_attribution(doc(9.0, 1.9), attention)["share"] == 1.0  # better overall and on AR
    assert ar_slice.gap_attribution(doc(9.44, 3.0), attention)["share"] is None  # no overall gap
    worse_overall_better_ar = ar_slice.gap_attribution(doc(10.0, 1.5), attention)
    assert worse_overall_better_ar["share"] < 0


# ----------------------------------------------------------------------------- the bigram-count file


SPM = {"type": "SPMTokenizer", "vocab_size": 10, "eod": 1, "files": {"vocab_file": "sha256:aa"}}
GPT2 = {"type": "GPT2BPETokenizer", "vocab_size": 10, "eod": 9,
        "files": {"merge_file": "sha256:cc", "vocab_file": "sha256:dd"}}


def save_counts(path, pairs: dict, vocab=10, tokenizer=None):
    keys = [a * vocab + b for a, b in pairs]
    bigrams.save_bigram_counts(path, BigramCounts.from_arrays(keys, list(pairs.values()), vocab, tokenizer))
    return path


def test_load_bigram_counts_round_trip_and_lookup(tmp_path):
    path = save_counts(tmp_path / "bigrams.npz", {(1, 2): 2, (2, 1): 1, (2, 3): 2}, tokenizer=SPM)
    for expected in (SPM, bigrams.identity_id(SPM), None):
        c = ar_slice.load_bigram_counts(path, expected_vocab_size=10, expected_tokenizer=expected)
        assert c.lookup(np.array([1, 2, 2, 3]), np.array([2, 1, 3, 1]), missing=0).tolist() == [2, 1, 2, 0]
        assert isinstance(c, BigramCounts) and c.path == str(path)


def test_missing_bigram_file_is_a_clear_error(tmp_path):
    with pytest.raises(ARSliceError, match=r"ar_eval.bigram_counts: bigram-count file .*nope.npz not found; build it"):
        ar_slice.load_bigram_counts(tmp_path / "nope.npz")
    with pytest.raises(ARSliceError, match=r"ar_eval.bigram_counts: bigram-count file \(not set\) not found"):
        ar_slice.load_bigram_counts(None)


def test_mismatched_vocab_or_tokenizer_is_a_clear_error(tmp_path):
    path = save_counts(tmp_path / "bigrams.npz", {(1, 2): 3}, tokenizer=GPT2)
    with pytest.raises(ARSliceError, match=r"vocabulary of 10 tokens but the model's tokenizer has 512; rebuild the "
                                           r"counts with this run's tokenizer \(python -m tokenization.bigrams"):
        ar_slice.load_bigram_counts(path, expected_vocab_size=512)
    with pytest.raises(ARSliceError,
                       match=r"counted with tokenizer 'GPT2BPETokenizer:\w+' .* this run uses 'SPMTokenizer:"):
        ar_slice.load_bigram_counts(path, expected_tokenizer=SPM)
    with pytest.raises(ARSliceError, match=r"this run uses 'SPMTokenizer:0123'"):
        ar_slice.load_bigram_counts(path, expected_tokenizer="SPMTokenizer:0123")
    counts = ar_slice.load_bigram_counts(path)
    with pytest.raises(ARSliceError, match=r"token id 11 is outside the 10-token vocabulary"):
        token_slices(np.array([[1, 2]]), np.array([[2, 11]]), counts)


def test_not_a_bigram_file_is_a_clear_error(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, inputs=np.zeros(3))
    with pytest.raises(ARSliceError, match=r"^ar_eval.bigram_counts: .*other.npz lacks format, keys, counts.*: not a "
                                           r"neox_zoology.bigram_counts/1 file; count again with python -m "
                                           r"tokenization.bigrams"):
        ar_slice.load_bigram_counts(path)
    # the plain layout of keys and counts over every training bigram is not read (one format)
    np.savez(path, keys=np.array([3, 5]), counts=np.array([1, 1]), vocab_size=10, tokenizer="SPMTokenizer",
             train_tokens=7)
    with pytest.raises(ARSliceError, match=r"lacks format, eval_counts"):
        ar_slice.load_bigram_counts(path)
    c = BigramCounts.from_arrays([3, 5], [1, 1], 10)
    c.keys = c.keys[::-1].copy()
    bigrams.save_bigram_counts(path, c)
    with pytest.raises(ARSliceError, match="keys are not sorted distinct bigrams"):
        ar_slice.load_bigram_counts(path)


# ----------------------------------------------------------------------------- the ar_eval config section


def test_ar_eval_config_defaults_and_errors(tmp_path):
    from neox_zoology.config import ConfigError, build_args

    args = build_args({"vocab_size": 100}, world_size=1)
    assert args.ar_eval["enabled"] is False and args.ar_eval["threshold"] == 1250
    with pytest.raises(ConfigError, match=r"ar_eval.bigram_counts is not set but ar_eval.enabled is true; set it"):
        build_args({"ar_eval": {"enabled": True}}, world_size=1)
    # a missing counts file: refused for a launch (check_paths), noted by a dry run, which plans without it
    from neox_zoology.config import check_paths

    missing = build_args({"vocab_size": 100, "ar_eval": {"enabled": True, "bigram_counts": str(tmp_path / "missing.npz")}},
                         world_size=1)
    check_paths(missing, need_data=False)
    assert any("missing.npz not found (a launch needs it)" in n for n in missing.config_notes)
    from test_bigrams import write_dataset

    data = write_dataset(tmp_path / "d", [np.arange(i, i + 40) % 100 for i in range(200)])
    with pytest.raises(ConfigError, match=r"ar_eval.bigram_counts: file .*missing.npz not found; build it"):
        check_paths(build_args({"vocab_size": 100, "seq_length": 32, "data_path": data, "split": "90,10,0", "ar_eval": {
            "enabled": True, "bigram_counts": str(tmp_path / "missing.npz")}}, world_size=1))
    with pytest.raises(ConfigError, match=r"ar_eval.treshold: unknown key; did you mean threshold\?"):
        build_args({"ar_eval": {"treshold": 3}}, world_size=1)
    with pytest.raises(ConfigError, match=r"ar_eval.iters: 0; use a positive integer"):
        build_args({"ar_eval": {"iters": 0}}, world_size=1)
    f = tmp_path / "b.npz"
    bigrams.save_bigram_counts(f, BigramCounts.from_arrays([1], [1], 100))
    args = build_args({"ar_eval": {"enabled": True, "bigram-counts": str(f), "iters": 3}}, world_size=1)
    assert args.ar_eval["bigram_counts"] == str(f) and args.ar_eval["iters"] == 3 and args.ar_eval["strict"] is False


def test_counts_files_of_tokenization_bigrams_are_read_and_checked(tmp_path):
    ident = {"type": "SPMTokenizer", "vocab_size": 10, "eod": 1, "files": {"spm.model": "sha256:aa"}}
    other = {**ident, "files": {"spm.model": "sha256:bb"}}
    keys = np.array([1 * 10 + 2, 2 * 10 + 3], dtype=np.int64)  # the evaluation data's bigrams (1,2) and (2,3)
    c = bigrams.BigramCounts(keys=keys, counts=np.array([0, 5000], dtype=np.int64), eval_counts=np.array([2, 1]),
                             vocab_size=10, tokenizer=ident, tokenizer_id=bigrams.identity_id(ident), train_tokens=9,
                             train_available=9, max_train_tokens=None, eval_tokens=4, train_prefixes=["t"],
                             eval_prefixes=["e"])
    path = tmp_path / "counts.npz"
    bigrams.save_bigram_counts(path, c)
    counts = ar_slice.load_bigram_counts(path, expected_vocab_size=10, expected_tokenizer=ident)
    s = token_slices(np.array([[1, 2, 1, 2, 7]]), np.array([[2, 1, 2, 3, 7]]), counts, threshold=1250)
    # (1,2) repeats with 0 training occurrences -> hit; (2,3) and (7,7) are first occurrences
    assert s.ar_hit[0].tolist() == [False, False, True, False, False]
    assert s.train_count[0].tolist() == [0, 0, 0, 5000, 0] and s.known[0].tolist() == [True, False, True, True, False]
    sums = SliceSums()
    sums.add(np.ones((1, 5)), s)
    doc = ar_slice.summarize(sums)
    assert doc["bigrams_not_in_counts"] == 2  # (2,1) and (7,7) were not in the counted evaluation data
    assert "not in the counts file" in ar_slice.format_summary(doc)
    sums = SliceSums()
    sums.add(np.ones((1, 5)), s, loss_mask=np.array([[1, 0, 1, 1, 0]]))
    assert "not in the counts file" not in ar_slice.format_summary(ar_slice.summarize(sums))
    with pytest.raises(ARSliceError, match=r"^ar_eval.bigram_counts: .*counted with tokenizer 'SPMTokenizer:"):
        ar_slice.load_bigram_counts(path, expected_tokenizer=other)
    with pytest.raises(ARSliceError, match=r"^ar_eval.bigram_counts: .*vocabulary of 10 tokens but the model's "
                                           r"tokenizer has 512"):
        ar_slice.load_bigram_counts(path, expected_vocab_size=512)


def copy_corpus(tiny_corpus, folder: Path) -> tuple[str, str]:
    """The tiny corpus's dataset (with its tokenizer record) and tokenizer, in a folder of its own."""
    folder.mkdir(parents=True, exist_ok=True)
    src = Path(tiny_corpus["data_prefix"])
    for suffix in (".bin", ".idx", ".json"):
        shutil.copy(str(src) + suffix, folder / (src.name + suffix))
    shutil.copy(tiny_corpus["tokenizer"], folder / "spm.model")
    return str(folder / src.name), str(folder / "spm.model")


def test_counts_written_by_the_command_line_load_in_the_ar_slice_evaluation(tiny_corpus, tmp_path, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from neox_zoology.tokenizer import build_tokenizer

    prefix, spm = copy_corpus(tiny_corpus, tmp_path / "data")
    out = tmp_path / "bigrams.npz"
    bigrams.main(["--train-prefix", prefix, "--split", "90,10,0", "--out", str(out), "--no-progress"])
    assert "distinct evaluation bigrams" in capsys.readouterr().out
    tok = build_tokenizer("SPMTokenizer", spm, None)
    counts = ar_slice.load_bigram_counts(out, expected_vocab_size=tok.vocab_size, expected_tokenizer=tok)

    docs = IndexedDataset(prefix, mmap=True)
    train, valid, _ = bigrams.split_documents(prefix, "90,10,0")
    train_tokens = [t for i in range(train.start, train.stop) for t in docs[i].tolist()]
    valid_tokens = np.concatenate([docs[i] for i in range(valid.start, valid.stop)]).astype(np.int64)
    reference = Counter(zip(train_tokens, train_tokens[1:]))
    # the evaluation's view of the validation tokens: every bigram is known, with its training count
    s = token_slices(valid_tokens[None, :-1], valid_tokens[None, 1:], counts, threshold=3)
    assert s.known.all()
    pairs = zip(valid_tokens[:-1].tolist(), valid_tokens[1:].tolist())
    assert s.train_count[0].tolist() == [reference[pair] for pair in pairs]
    assert s.ar_hit.any() and (s.train_count[s.ar_hit] <= 3).all()
    # another tokenizer is refused with the evaluation's message
    with pytest.raises(ARSliceError, match=r"counted with tokenizer 'SPMTokenizer:\w+' .* this run uses 'Other:"):
        ar_slice.load_bigram_counts(out, expected_tokenizer={**counts.tokenizer, "type": "Other"})


def test_demo_counts_the_training_documents_of_its_split_once(tiny_corpus, tiny_raw, tmp_path):
    from eval import demo
    from neox_zoology.tokenizer import build_tokenizer

    prefix, spm = copy_corpus(tiny_corpus, tmp_path / "data")
    config = tmp_path / "demo.yml"
    config.write_text(json.dumps(tiny_raw(data_path=prefix, vocab_file=spm, split="80,20,0")))
    path = demo._demo_bigram_counts(str(config))
    assert path == str(tmp_path / "data" / "bigrams_train.npz")
    train, valid, _ = bigrams.split_documents(prefix, "80,20,0")
    tok = build_tokenizer("SPMTokenizer", spm, None)
    counts = ar_slice.load_bigram_counts(path, expected_vocab_size=tok.vocab_size, expected_tokenizer=tok)
    assert counts.train_parts == [train] and counts.eval_parts == [valid] and valid.start == train.stop > 0
    expected = bigrams.count_bigrams([train], [valid])
    assert np.array_equal(counts.keys, expected.keys) and np.array_equal(counts.counts, expected.counts)
    assert counts.train_tokens == bigrams.dataset_info(train).tokens < bigrams.dataset_info(prefix).tokens

    made = Path(path).stat().st_mtime_ns
    assert demo._demo_bigram_counts(str(config)) == path and Path(path).stat().st_mtime_ns == made  # kept
    config.write_text(json.dumps(tiny_raw(data_path=prefix, vocab_file=spm, split="90,10,0")))
    assert demo._demo_bigram_counts(str(config)) == path  # another split: counted again
    train, valid, _ = bigrams.split_documents(prefix, "90,10,0")
    assert ar_slice.load_bigram_counts(path).train_parts == [train]


def _freq_doc(rows):
    """An ar_slice.json with only `by_frequency` rows: (min, max, ar tokens, ar nll, other tokens, other nll)."""
    return {"by_frequency": [{"min_count": lo, "max_count": hi, "ar_hits": {"tokens": na, "nll": la},
                              "other": {"tokens": no, "nll": lo_nll}} for lo, hi, na, la, no, lo_nll in rows]}


def test_frequency_matched_gap_weights_buckets_by_their_ar_hits():
    doc = _freq_doc([(0, 0, 30, 7.3, 500, 7.4), (1, 1, 10, 5.0, 200, 4.0), (2, 3, 0, None, 100, 3.0)])
    m = ar_slice.frequency_matched(doc)
    assert m["ar_hits_matched"] == 40
    assert m["matched_gap"] == pytest.approx((30 * -0.1 + 10 * 1.0) / 40)
    assert m["unseen"] == {"ar_hits_nll": 7.3, "ar_hits_tokens": 30, "other_nll": 7.4, "other_tokens": 500}
    assert ar_slice.frequency_matched(_freq_doc([(2, 3, 0, None, 100, 3.0)])) is None


def test_demo_reads_no_recall_when_ar_hits_score_like_their_frequency():
    from eval import demo

    text = demo.reading(_freq_doc([(0, 0, 30, 7.30, 500, 7.40), (1, 1, 10, 5.0, 200, 5.1)]))
    assert "AR hits 7.30 nats (30 tokens) vs other tokens 7.40 nats (500)" in text
    assert "does not recall from its context yet" in text and "not the paper's finding" in text
    text = demo.reading(_freq_doc([(0, 0, 30, 2.0, 500, 7.4)]))
    assert "recalls from its context" in text and "not the paper's finding" not in text


def test_demo_mqar_contrast_trains_both_patterns(monkeypatch, capsys):
    from eval import demo

    monkeypatch.setattr(demo, "MQAR_CONTRAST", {**demo.MQAR_CONTRAST, "seq_len": 32, "kv": 2, "d_model": 16,
                                                "steps": 3})
    demo._mqar_contrast(workers=2)
    out = capsys.readouterr().out
    assert "MQAR (L 32, 2 key-value pairs, d 16, 3 steps" in out
    assert "baseconv             test accuracy" in out and "baseconv+attention   test accuracy" in out
    assert "contrast        attention as the second layer:" in out

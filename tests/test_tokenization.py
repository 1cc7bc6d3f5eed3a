"""Tokenizers, SentencePiece training and the demo corpus builder (tokenization/)."""

import json
import re
import unicodedata
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
import tokenizers

from tokenization import demo_corpus
from tokenization.demo_corpus import build_demo_corpus
from neox_zoology.tokenizer import build_tokenizer
from tokenization.train_spm import main as train_spm_main
from tokenization.train_spm import train_spm

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "tokenizers"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} not present")

MIXED_TEXT = (
    "The quick brown fox doesn't jump; it's 3.14159 times lazier than 42 dogs.\n\n"
    "def add(a, b):\n\tif a:\n        return a + b  # two spaces, then a comment\n\n\n"
    "Größe, naïve café, Ελληνικά, русский, 日本語のテキスト, 한국어, emoji 😀🚀 and ½ ²\n"
    "   leading spaces, trailing spaces   \n"
    "x<|endoftext|>y {\"json\": [1, 2, 3]} C:\\path\\file.txt ... !!! ???"
)


# --- a plain reference of OpenAI's GPT-2 encoder: regex split, bytes -> unicode, rank merges ---


@lru_cache(maxsize=None)
def _gpt2_pattern() -> re.Pattern:
    # GPT-2's split regex uses \p{L} and \p{N}; the re module lacks them, so build the classes.
    ranges = {"L": [], "N": []}
    for major, out in ranges.items():
        start = None
        for cp in range(0x110001):
            inside = cp < 0x110000 and unicodedata.category(chr(cp))[0] == major
            if inside and start is None:
                start = cp
            elif not inside and start is not None:
                out.append(f"{re.escape(chr(start))}-{re.escape(chr(cp - 1))}")
                start = None
    letters, numbers = "".join(ranges["L"]), "".join(ranges["N"])
    return re.compile(
        rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{letters}]+| ?[{numbers}]+| ?[^\s{letters}{numbers}]+"
        r"|\s+(?!\S)|\s+"
    )


def _bytes_to_unicode() -> dict[int, str]:
    # Printable bytes stand for themselves; the rest are shifted past 255.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _bpe(word: str, ranks: dict) -> list[str]:
    parts = list(word)
    while len(parts) > 1:
        pair = min(zip(parts, parts[1:]), key=lambda p: ranks.get(p, float("inf")))
        if pair not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def reference_gpt2_encode(text: str, vocab_file: Path, merge_file: Path) -> list[int]:
    vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    lines = merge_file.read_text(encoding="utf-8").splitlines()
    ranks = {tuple(line.split()): r for r, line in enumerate(l for l in lines[1:] if l.strip())}
    byte_chars = _bytes_to_unicode()
    ids = []
    for piece in _gpt2_pattern().findall(text):
        word = "".join(byte_chars[b] for b in piece.encode("utf-8"))
        ids += [vocab[token] for token in _bpe(word, ranks)]
    return ids


# --- the real Pile tokenizers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2():
    return build_tokenizer(
        "GPT2BPETokenizer", SHARED / "gpt2-vocab.json", SHARED / "gpt2-merges.txt"
    )


@pytest.fixture(scope="module")
def neox20b():
    return build_tokenizer("HFTokenizer", SHARED / "20B_tokenizer.json")


@needs_shared
def test_gpt2_known_encoding_and_special_ids(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert (gpt2.vocab_size, gpt2.eod, gpt2.pad) == (50257, 50256, 50256)


@needs_shared
def test_gpt2_matches_reference_encoder_on_mixed_text(gpt2):
    expected = reference_gpt2_encode(
        MIXED_TEXT, SHARED / "gpt2-vocab.json", SHARED / "gpt2-merges.txt"
    )
    assert gpt2.encode(MIXED_TEXT) == expected
    assert gpt2.eod not in expected  # literal <|endoftext|> text is not a document boundary


@needs_shared
def test_neox20b_known_encoding_and_special_ids(neox20b):
    assert neox20b.encode("Hello world") == [12092, 1533]
    assert (neox20b.vocab_size, neox20b.eod, neox20b.pad) == (50277, 0, 1)


@needs_shared
def test_neox20b_matches_tokenizers_library_on_mixed_text(neox20b):
    reference = tokenizers.Tokenizer.from_file(str(SHARED / "20B_tokenizer.json"))
    assert neox20b.encode(MIXED_TEXT) == reference.encode(MIXED_TEXT).ids


@needs_shared
@pytest.mark.parametrize("name", ["gpt2", "neox20b"])
def test_real_tokenizers_round_trip_and_batch(name, request):
    tok = request.getfixturevalue(name)
    texts = MIXED_TEXT.split("\n")
    assert tok.decode(tok.encode(MIXED_TEXT)) == MIXED_TEXT
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


# --- small tokenizers built here ----------------------------------------------------------------

TRAIN_TEXT = [MIXED_TEXT, *(f"line {i}: x_{i} is {i * i}; don't panic." for i in range(300))]


@pytest.fixture(scope="module")
def tiny_bpe_files(tmp_path_factory):
    """A byte-level BPE trained with the tokenizers library, saved as vocab.json + merges.txt."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(TRAIN_TEXT, trainer)
    folder = tmp_path_factory.mktemp("tiny_bpe")
    vocab_file, merge_file = backend.model.save(str(folder))
    return Path(vocab_file), Path(merge_file), backend


def test_tiny_gpt2_bpe_matches_reference_and_trained_backend(tiny_bpe_files):
    vocab_file, merge_file, backend = tiny_bpe_files
    tok = build_tokenizer("GPT2BPETokenizer", str(vocab_file), str(merge_file))
    vocab = json.loads(vocab_file.read_text())
    assert tok.eod == tok.pad == vocab["<|endoftext|>"]
    assert tok.vocab_size == len(vocab)
    assert tok.encode(MIXED_TEXT) == reference_gpt2_encode(MIXED_TEXT, vocab_file, merge_file)
    # The trained backend registers <|endoftext|> as special, so compare on text without it.
    plain = MIXED_TEXT.replace("<|endoftext|>", "")
    assert tok.encode(plain) == backend.encode(plain).ids
    assert tok.decode(tok.encode(MIXED_TEXT)) == MIXED_TEXT


@pytest.fixture(scope="module")
def tiny_spm(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("tiny_spm") / "spm"
    return train_spm(TRAIN_TEXT, prefix, vocab_size=350)


def test_spm_eod_is_its_own_endoftext_piece(tiny_spm):
    tok = build_tokenizer("SPMTokenizer", tiny_spm)
    reference = sentencepiece.SentencePieceProcessor(model_file=tiny_spm)
    assert reference.id_to_piece(tok.eod) == "<|endoftext|>"
    assert tok.eod not in (reference.unk_id(), reference.bos_id(), reference.eos_id())
    assert reference.id_to_piece(tok.pad) == "<pad>" and tok.pad != tok.eod
    assert tok.vocab_size == reference.get_piece_size() == 350


def test_spm_matches_sentencepiece_and_round_trips_unicode(tiny_spm):
    tok = build_tokenizer("SPMTokenizer", tiny_spm)
    reference = sentencepiece.SentencePieceProcessor(model_file=tiny_spm)
    ids = tok.encode(MIXED_TEXT)
    assert ids == reference.encode(MIXED_TEXT)
    assert tok.decode(ids) == MIXED_TEXT  # byte fallback + no normalisation: lossless
    assert tok.eod not in ids  # a control symbol: text never encodes to it
    texts = MIXED_TEXT.split("\n")
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_spm_without_endoftext_uses_eos(tmp_path):
    prefix = tmp_path / "plain"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAIN_TEXT), model_prefix=str(prefix), vocab_size=300,
        model_type="bpe", minloglevel=2,
    )
    tok = build_tokenizer("SPMTokenizer", f"{prefix}.model")
    assert tok.eod == sentencepiece.SentencePieceProcessor(model_file=f"{prefix}.model").eos_id()
    assert tok.pad == tok.eod  # no pad piece either


def test_train_spm_command_line_reads_jsonl(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"content": t}) + "\n" for t in TRAIN_TEXT))
    prefix = tmp_path / "cli"
    train_spm_main(["--input", str(corpus), "--model-prefix", str(prefix),
                    "--vocab-size", "400", "--jsonl-key", "content", "--max-sentences", "1000"])
    tok = build_tokenizer("SPMTokenizer", f"{prefix}.model")
    assert tok.vocab_size == 400
    assert tok.decode(tok.encode(MIXED_TEXT)) == MIXED_TEXT


def test_unique_identifiers_name_class_and_files(tiny_bpe_files, tiny_spm):
    vocab_file, merge_file, _ = tiny_bpe_files
    bpe = build_tokenizer("GPT2BPETokenizer", str(vocab_file), str(merge_file))
    assert bpe.unique_identifiers["class"] == "GPT2BPETokenizer"
    assert bpe.unique_identifiers["vocab_file"] == str(vocab_file.resolve())
    assert bpe.unique_identifiers["merge_file"] == str(merge_file.resolve())
    spm = build_tokenizer("SPMTokenizer", tiny_spm)
    assert list(spm.unique_identifiers.items()) == [
        ("class", "SPMTokenizer"), ("vocab_file", str(Path(tiny_spm).resolve()))
    ]


# --- errors -------------------------------------------------------------------------------------


def test_unknown_type_lists_valid_types_and_suggests_nearest():
    with pytest.raises(ValueError, match="GPT2BPETokenizer, HFTokenizer, SPMTokenizer") as err:
        build_tokenizer("SPMTokenzer", "x.model")
    assert "'SPMTokenzer'" in str(err.value) and "did you mean 'SPMTokenizer'" in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_names_the_file(tmp_path, tiny_bpe_files):
    missing = tmp_path / "nope.model"
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        build_tokenizer("SPMTokenizer", str(missing))
    with pytest.raises(ValueError, match="merge_file"):
        build_tokenizer("GPT2BPETokenizer", str(tiny_bpe_files[0]))


# --- demo corpus --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo_corpus(tmp_path_factory.mktemp("demo"), max_mb=0.3, vocab_size=1024)


def test_demo_corpus_is_pile_jsonl(demo):
    lines = Path(demo["corpus"]).read_text().splitlines()
    assert len(lines) == demo["documents"] > 10
    records = [json.loads(line) for line in lines]
    assert all(r["meta"] == {"pile_set_name": "python-stdlib"} for r in records)
    assert sum(len(r["text"].encode()) for r in records) <= 0.3 * 1024 * 1024


def test_demo_indexed_dataset_has_one_document_per_line_ending_in_eod(demo):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(demo["data_prefix"])
    tok = build_tokenizer("SPMTokenizer", demo["tokenizer"])
    assert len(dataset.document_indices) - 1 == demo["documents"] == len(dataset)
    assert dataset.index.dtype == np.uint16
    assert int(dataset.sequence_lengths.sum()) == demo["tokens"]
    docs = [dataset[i] for i in range(len(dataset))]
    assert all(doc[-1] == tok.eod and tok.eod not in doc[:-1] for doc in docs)
    first_text = json.loads(Path(demo["corpus"]).read_text().splitlines()[0])["text"]
    assert tok.decode(docs[0][:-1].tolist()) == first_text


def test_demo_build_is_idempotent(demo):
    out = Path(demo["corpus"]).parent
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = build_demo_corpus(out, max_mb=0.3, vocab_size=1024)
    assert again["built"] is False
    assert (again["documents"], again["tokens"]) == (demo["documents"], demo["tokens"])
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def test_interrupted_demo_build_leaves_nothing_readable(tmp_path, monkeypatch):
    def fail(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_corpus, "_write_indexed_dataset", fail)
    with pytest.raises(KeyboardInterrupt):
        build_demo_corpus(tmp_path, max_mb=0.05, vocab_size=1024)
    assert list(tmp_path.iterdir()) == []

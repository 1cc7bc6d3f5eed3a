"""tokenization.preprocess: JSON lines -> megatron-core .bin/.idx, bad lines, atomic output, workers."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zstandard

from tokenization import preprocess as pp
from neox_zoology.tokenizer import tokenizer_identity
from tokenization.preprocess import PreprocessError, expand_inputs, preprocess
from neox_zoology.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------- building blocks

WORDS = ("the quick brown fox jumps over lazy dogs while code runs: def f(x): return x * 2 "
         "Größe naïve café Ελληνικά русский 日本語 emoji 😀 tabs\tand\nnew lines").split(" ")


def random_texts(n: int, seed: int = 0, words: int = 40) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, words))) + f" #{i}"
            for i in range(n)]


def train_tiny_bpe(folder: Path, vocab_size: int = 400) -> dict:
    """A byte-level BPE saved as GPT-2 style vocab/merges and as a tokenizers JSON file."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(random_texts(400, seed=1), trainer)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = backend.model.save(str(folder))
    backend.save(str(folder / "tokenizer.json"))
    return {"vocab": vocab, "merges": merges, "json": str(folder / "tokenizer.json")}


def write_jsonl(path: Path, records: list, *, zst_frames: int = 0) -> Path:
    """Write records (dicts, or raw bytes lines) as JSON lines, zstd-compressed with zst_frames > 0."""
    lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in records]
    data = b"".join(line + b"\n" for line in lines)
    if zst_frames:
        cut = [len(lines) * i // zst_frames for i in range(zst_frames + 1)]
        c = zstandard.ZstdCompressor()
        data = b"".join(c.compress(b"".join(l + b"\n" for l in lines[a:b])) for a, b in zip(cut, cut[1:]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def docs(texts, set_name="web"):
    return [{"text": t, "meta": {"pile_set_name": set_name}} for t in texts]


def read_dataset(prefix: str) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix, mmap=True)
    assert len(dataset.document_indices) == len(dataset) + 1  # one sequence per document
    return [dataset[i].tolist() for i in range(len(dataset))]


def outputs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return train_tiny_bpe(tmp_path_factory.mktemp("tiny_bpe"))


@pytest.fixture(scope="module")
def tiny_spm_model(tmp_path_factory):
    from tokenization.train_spm import train_spm

    return train_spm(random_texts(300, seed=2), tmp_path_factory.mktemp("spm") / "spm", vocab_size=400)


def run(inputs, prefix, tiny, **kw):
    kw.setdefault("append_eod", True)
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return preprocess(inputs, prefix, "GPT2BPETokenizer", tiny["vocab"], tiny["merges"], **kw)


# ------------------------------------------------------------------------------ the happy path


@pytest.mark.parametrize("kind", ["GPT2BPETokenizer", "HFTokenizer", "SPMTokenizer"])
def test_each_document_is_its_encoding_plus_eod_read_by_megatron(tmp_path, tiny, tiny_spm_model, kind):
    files = {"GPT2BPETokenizer": (tiny["vocab"], tiny["merges"]), "HFTokenizer": (tiny["json"], None),
             "SPMTokenizer": (tiny_spm_model, None)}[kind]
    tok = build_tokenizer(kind, *files)
    texts = random_texts(60)
    src = write_jsonl(tmp_path / "in.jsonl", docs(texts))
    result = preprocess([src], tmp_path / "out" / "p", kind, *files, append_eod=True, workers=1,
                        progress=False)

    got = read_dataset(str(tmp_path / "out" / "p_text_document"))
    assert got == [tok.encode(t) + [tok.eod] for t in texts]
    assert result["documents"] == 60 and result["tokens"] == sum(map(len, got))
    assert result["skipped"] == 0 and result["lines"] == 60
    assert result["pile_set_names"] == {"web": {"documents": 60, "tokens": result["tokens"]}}
    record = json.loads((tmp_path / "out" / "p_text_document.json").read_text())
    assert record["tokenizer"] == tokenizer_identity(tok)
    assert record["tokenizer"]["type"] == kind and record["dtype"] == "uint16"
    assert outputs(tmp_path / "out") == ["p_report.json", "p_text_document.bin", "p_text_document.idx",
                                         "p_text_document.json"]


def test_without_append_eod_documents_are_bare_encodings(tmp_path, tiny):
    tok = build_tokenizer("GPT2BPETokenizer", tiny["vocab"], tiny["merges"])
    texts = random_texts(10)
    run([write_jsonl(tmp_path / "a.jsonl", docs(texts))], tmp_path / "p", tiny, append_eod=False)
    assert read_dataset(str(tmp_path / "p_text_document")) == [tok.encode(t) for t in texts]


def test_idx_is_byte_identical_to_megatron_builder(tmp_path, monkeypatch):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder_class = pp.array_builder_class()
    monkeypatch.setattr(builder_class, "BLOCK", 3)  # several blocks of pointers and indices
    rng = np.random.default_rng(0)
    for dtype in (np.uint16, np.int32):
        lengths = rng.integers(1, 50, size=11)
        tokens = rng.integers(0, 30000, size=int(lengths.sum())).astype(dtype)
        reference = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=dtype)
        for doc in np.split(tokens, np.cumsum(lengths)[:-1]):
            reference.add_document(doc, [len(doc)])
        reference.finalize(str(tmp_path / "ref.idx"))
        ours = builder_class(str(tmp_path / "ours.bin"), dtype)
        ours.add_documents(tokens[:0], lengths[:0])  # an empty batch, then the documents in two
        ours.add_documents(tokens[:lengths[:4].sum()], lengths[:4])
        ours.add_documents(tokens[lengths[:4].sum():], lengths[4:])
        ours.finalize(str(tmp_path / "ours.idx"))
        for ext in ("bin", "idx"):
            assert (tmp_path / f"ours.{ext}").read_bytes() == (tmp_path / f"ref.{ext}").read_bytes(), (dtype, ext)


def test_two_workers_write_the_same_bytes_as_one(tmp_path, tiny):
    texts = random_texts(400, seed=3)
    src = [write_jsonl(tmp_path / "a.jsonl.zst", docs(texts[:250]), zst_frames=1),
           write_jsonl(tmp_path / "b.jsonl", docs(texts[250:]))]
    one = run(src, tmp_path / "one" / "p", tiny, chunk_bytes=4096)
    two = run(src, tmp_path / "two" / "p", tiny, chunk_bytes=4096, workers=2)
    assert two["workers"] == 2 and one["documents"] == two["documents"] == 400
    for ext in ("bin", "idx"):
        assert ((tmp_path / "one" / f"p_text_document.{ext}").read_bytes()
                == (tmp_path / "two" / f"p_text_document.{ext}").read_bytes())


def test_compressed_inputs_folders_and_globs_give_the_same_tokens(tmp_path, tiny):
    texts = random_texts(300, seed=4, words=400)  # > 128 KiB: several zstd blocks
    plain = write_jsonl(tmp_path / "plain" / "x.jsonl", docs(texts))
    write_jsonl(tmp_path / "zst" / "1.jsonl.zst", docs(texts[:100]), zst_frames=3)  # multi-frame
    write_jsonl(tmp_path / "zst" / "2.json.zst", docs(texts[100:]), zst_frames=1)
    (tmp_path / "zst" / "notes.txt").write_text("not an input")
    run([plain], tmp_path / "a", tiny, chunk_bytes=10_000)
    run([tmp_path / "zst"], tmp_path / "b", tiny)  # a folder: its supported files, sorted
    run([str(tmp_path / "zst" / "*.zst")], tmp_path / "c", tiny)  # a quoted glob
    run([f"{tmp_path / 'zst' / '1.jsonl.zst'},{tmp_path / 'zst' / '2.json.zst'}"], tmp_path / "d", tiny)
    a = (tmp_path / "a_text_document.bin").read_bytes()
    for name in "bcd":
        assert (tmp_path / f"{name}_text_document.bin").read_bytes() == a


def test_multiple_keys_write_aligned_datasets(tmp_path, tiny):
    tok = build_tokenizer("GPT2BPETokenizer", tiny["vocab"], tiny["merges"])
    records = [{"title": f"title {i}", "text": t} for i, t in enumerate(random_texts(12))]
    records.insert(5, {"title": "no text here"})  # skipped for both keys, so they stay aligned
    result = run([write_jsonl(tmp_path / "a.jsonl", records)], tmp_path / "p", tiny,
                 jsonl_keys=["title,text"], max_bad_fraction=0.5)
    good = [r for r in records if "text" in r]
    assert read_dataset(str(tmp_path / "p_title_document")) == [tok.encode(r["title"]) + [tok.eod] for r in good]
    assert read_dataset(str(tmp_path / "p_text_document")) == [tok.encode(r["text"]) + [tok.eod] for r in good]
    assert result["skipped_by_reason"] == {"missing_key": 1}
    assert set(result["tokens_by_key"]) == {"title", "text"}


def test_demo_corpus_goes_through_preprocess_with_pile_set_name(tiny_corpus):
    folder = Path(tiny_corpus["data_prefix"]).parent
    record = json.loads(Path(tiny_corpus["data_prefix"] + ".json").read_text())
    report = json.loads((folder / "stdlib_report.json").read_text())
    assert record["pile_set_names"] == {"python-stdlib": {"documents": tiny_corpus["documents"],
                                                          "tokens": tiny_corpus["tokens"]}}
    assert record["tokenizer"] == tokenizer_identity(build_tokenizer("SPMTokenizer", tiny_corpus["tokenizer"]))
    assert report["status"] == "complete" and report["skipped"] == 0
    assert report["inputs"] == [str(folder / "corpus.jsonl")]  # names the final folder, not the build one


# ---------------------------------------------------------------------------------- bad input


def test_every_kind_of_bad_line_is_skipped_and_reported_with_file_and_line(tmp_path, tiny):
    tok = build_tokenizer("GPT2BPETokenizer", tiny["vocab"], tiny["merges"])
    texts = random_texts(40, seed=5)
    good = [json.dumps(d).encode() for d in docs(texts[:20], "a") + docs(texts[20:], "b")]
    bad = {
        3: (b'{"text": "cut in the mid', "invalid_json"),
        6: (b'{"body": "x", "meta": {}}', "missing_key"),
        9: (b'{"text": null}', "not_a_string"),
        12: (b'{"text": ["a", "list"]}', "not_a_string"),
        15: (b'{"text": "caf\xe9"}', "invalid_utf8"),
        18: (b'{"text": "lone \\udc80 surrogate"}', "invalid_utf8"),
        21: (b'{"text": ""}', "empty"),
        24: (b'{"text": "  \\n "}', "empty"),
        27: (b"", "empty"),
        30: (b'"just a string"', "not_an_object"),
    }
    lines = list(good)
    for line_no in sorted(bad):
        lines.insert(line_no - 1, bad[line_no][0])
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    result = run([src], tmp_path / "p", tiny, max_bad_fraction=0.5, chunk_bytes=300)

    report = json.loads((tmp_path / "p_report.json").read_text())
    assert [(s["file"], s["line"], s["reason"]) for s in report["skipped_lines"]] == [
        (str(src), n, reason) for n, (_, reason) in sorted(bad.items())]
    assert all(s["detail"] for s in report["skipped_lines"])
    assert "'text' is null" in report["skipped_lines"][2]["detail"]
    assert result["skipped"] == 10 and result["lines"] == 50 and result["documents"] == 40
    assert result["skipped_by_reason"] == {"invalid_utf8": 2, "invalid_json": 1, "not_an_object": 1,
                                           "missing_key": 1, "not_a_string": 2, "empty": 3}
    assert read_dataset(str(tmp_path / "p_text_document")) == [tok.encode(t) + [tok.eod] for t in texts]
    assert result["pile_set_names"]["a"]["documents"] == 20 == result["pile_set_names"]["b"]["documents"]


def test_truncated_zst_keeps_every_complete_line_and_reports_the_cut(tmp_path, tiny):
    tok = build_tokenizer("GPT2BPETokenizer", tiny["vocab"], tiny["merges"])
    texts = random_texts(400, seed=6, words=200)  # several 128 KiB zstd blocks
    full = write_jsonl(tmp_path / "full.jsonl.zst", docs(texts), zst_frames=1).read_bytes()
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(full[: len(full) // 2])
    recoverable = zstandard.ZstdDecompressor().decompressobj().decompress(cut.read_bytes()).count(b"\n")
    assert 0 < recoverable < 400
    result = run([cut], tmp_path / "p", tiny, max_bad_fraction=0.5)

    assert read_dataset(str(tmp_path / "p_text_document")) == [tok.encode(t) + [tok.eod] for t in texts[:recoverable]]
    report = json.loads((tmp_path / "p_report.json").read_text())
    assert [(s["file"], s["line"], s["reason"]) for s in report["skipped_lines"]] == [
        (str(cut), recoverable + 1, "truncated_zst")]
    assert result["skipped_by_reason"] == {"truncated_zst": 1}


def test_corrupt_zst_keeps_the_lines_before_and_skips_the_rest_of_that_file(tmp_path, tiny):
    texts = random_texts(30, seed=7)
    good = write_jsonl(tmp_path / "a.jsonl.zst", docs(texts[:20]), zst_frames=1).read_bytes()
    (tmp_path / "a.jsonl.zst").write_bytes(good + b"\x00garbage that is no zstd frame" * 10)
    other = write_jsonl(tmp_path / "b.jsonl", docs(texts[20:]))
    result = run([tmp_path / "a.jsonl.zst", other], tmp_path / "p", tiny, max_bad_fraction=0.5)
    assert result["documents"] == 30
    report = json.loads((tmp_path / "p_report.json").read_text())
    assert [(s["line"], s["reason"]) for s in report["skipped_lines"]] == [(21, "corrupt_zst")]


def test_too_many_bad_lines_fail_naming_file_and_line_and_keep_the_old_dataset(tmp_path, tiny):
    texts = random_texts(30, seed=8)
    run([write_jsonl(tmp_path / "old.jsonl", docs(texts))], tmp_path / "p", tiny)
    old = {ext: (tmp_path / f"p_text_document.{ext}").read_bytes() for ext in ("bin", "idx", "json")}

    lines = [json.dumps(d).encode() for d in docs(texts)]
    lines[7] = b"{not json"
    lines[19] = b'{"text": 5}'
    src = write_jsonl(tmp_path / "new.jsonl", lines)
    with pytest.raises(PreprocessError) as err:
        run([src], tmp_path / "p", tiny, max_bad_fraction=0.05)
    message = str(err.value)
    assert f"{src}:20: not_a_string" in message  # the line that crossed the threshold
    assert "2 of the 30 lines" in message and "--max-bad-fraction 0.05" in message
    assert str(tmp_path / "p_report.json") in message
    for ext, data in old.items():  # the earlier dataset is untouched
        assert (tmp_path / f"p_text_document.{ext}").read_bytes() == data
    assert not [p for p in tmp_path.iterdir() if pp.PARTIAL in p.name]
    report = json.loads((tmp_path / "p_report.json").read_text())
    assert report["status"] == "failed" and [s["line"] for s in report["skipped_lines"]] == [8, 20]

    run([src], tmp_path / "p", tiny, max_bad_fraction=0.1)  # raising the limit lets it through
    assert len(read_dataset(str(tmp_path / "p_text_document"))) == 28


def test_bad_fraction_is_checked_early_once_enough_lines_are_read(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(pp, "EARLY_CHECK_LINES", 10)
    lines = [b"garbage"] * 5 + [json.dumps(d).encode() for d in docs(random_texts(200))]
    seen = []
    original = pp.ChunkTokenizer.__call__
    monkeypatch.setattr(pp.ChunkTokenizer, "__call__", lambda self, c: seen.append(c) or original(self, c))
    with pytest.raises(PreprocessError, match=r"in\.jsonl:5: invalid_json"):
        run([write_jsonl(tmp_path / "in.jsonl", lines)], tmp_path / "p", tiny, chunk_bytes=100)
    assert len(seen) < 10  # stopped soon after the first chunks, not at the end of the input
    assert outputs(tmp_path) == ["in.jsonl", "p_report.json"]


def test_interrupt_removes_partial_files_and_keeps_the_old_dataset(tmp_path, tiny, monkeypatch):
    run([write_jsonl(tmp_path / "old.jsonl", docs(random_texts(5)))], tmp_path / "p", tiny)
    old = (tmp_path / "p_text_document.idx").read_bytes()
    calls = []
    original = pp.ChunkTokenizer.__call__

    def interrupted(self, chunk):
        calls.append(chunk)
        if len(calls) == 3:  # as if Ctrl-C arrived mid-run, after .bin data was written
            assert any(pp.PARTIAL in p.name for p in tmp_path.iterdir())
            raise KeyboardInterrupt
        return original(self, chunk)

    monkeypatch.setattr(pp.ChunkTokenizer, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run([write_jsonl(tmp_path / "new.jsonl", docs(random_texts(100)))], tmp_path / "p", tiny,
            chunk_bytes=500)
    assert (tmp_path / "p_text_document.idx").read_bytes() == old
    assert not [p for p in tmp_path.iterdir() if pp.PARTIAL in p.name]
    assert json.loads((tmp_path / "p_report.json").read_text())["status"] == "interrupted"


def _wait_for_partial_output(folder: Path, done) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not done():
        found = list(folder.glob(f"*.bin{pp.PARTIAL}*")) if folder.exists() else []
        if found and found[0].stat().st_size > 0:
            return
        time.sleep(0.02)
    raise AssertionError("no partial output appeared while the run was going")


def test_ctrl_c_on_a_two_worker_run_leaves_no_dataset(tmp_path, tiny):
    src = write_jsonl(tmp_path / "in.jsonl", docs(random_texts(8000, seed=9, words=60)))
    cmd = [sys.executable, "-m", "tokenization.preprocess", "--input", str(src), "--output-prefix",
           str(tmp_path / "out" / "p"), "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file",
           tiny["vocab"], "--merge-file", tiny["merges"], "--append-eod", "--workers", "2",
           "--chunk-mb", "0.02", "--no-progress"]
    # a shell starts background jobs with SIGINT ignored, and the child would inherit that: restore the
    # default so the run reacts to Ctrl-C as in a terminal, however the test suite was launched
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for_partial_output(tmp_path / "out", lambda: proc.poll() is not None)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert b"interrupted" in err
    assert outputs(tmp_path / "out") == ["p_report.json"]
    assert json.loads((tmp_path / "out" / "p_report.json").read_text())["status"] == "interrupted"


def test_a_killed_worker_stops_the_run_with_a_clear_error(tmp_path, tiny):
    import multiprocessing
    import threading

    src = write_jsonl(tmp_path / "in.jsonl", docs(random_texts(8000, seed=10, words=60)))
    before = {p.pid for p in multiprocessing.active_children()}
    outcome = []

    def target():
        try:
            outcome.append(run([src], tmp_path / "out" / "p", tiny, workers=2, chunk_bytes=20_000))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    _wait_for_partial_output(tmp_path / "out", lambda: bool(outcome))
    workers = [p for p in multiprocessing.active_children() if p.pid not in before]
    assert len(workers) == 2
    os.kill(workers[0].pid, signal.SIGKILL)  # as the kernel's out-of-memory killer would
    thread.join(60)
    assert isinstance(outcome[0], RuntimeError), outcome
    assert "a preprocessing worker process died" in str(outcome[0])
    assert outputs(tmp_path / "out") == ["p_report.json"]


def test_stale_partial_files_of_dead_runs_are_removed(tmp_path, tiny):
    dead = tmp_path / f"p_text_document.bin{pp.PARTIAL}{2 ** 30 + 7}"
    alive = tmp_path / f"p_text_document.bin{pp.PARTIAL}{os.getppid()}"
    dead.write_bytes(b"x")
    alive.write_bytes(b"x")
    run([write_jsonl(tmp_path / "in.jsonl", docs(random_texts(3)))], tmp_path / "p", tiny)
    assert not dead.exists() and alive.exists()


# ------------------------------------------------------------------------------ errors and CLI


def test_a_byte_order_mark_opening_a_file_is_not_a_bad_line(tmp_path, tiny):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + write_jsonl(tmp_path / "x.jsonl", docs(["first", "second"])).read_bytes())
    assert run([path], tmp_path / "p", tiny)["documents"] == 2


def test_argument_errors_name_the_problem_and_the_fix(tmp_path, tiny):
    good = write_jsonl(tmp_path / "a.jsonl", docs(["x"]))
    (tmp_path / "a.txt").write_text("{}")
    (tmp_path / "empty").mkdir()
    cases = [
        ([tmp_path / "missing.jsonl"], {}, r"missing\.jsonl' does not exist: fix the path"),
        ([tmp_path / "a.txt"], {}, r"a\.txt': unsupported type; give JSON lines as \.jsonl"),
        ([good, str(good)], {}, r"a\.jsonl' is given twice"),
        ([tmp_path / "empty"], {}, r"folder .*empty' holds no"),
        ([str(tmp_path / "*.nothing")], {}, r"matches no file"),
        ([good], {"max_bad_fraction": 1.5}, r"--max-bad-fraction 1\.5 is not a fraction"),
        ([good], {"workers": 0}, r"--workers 0: give at least 1"),
        ([good], {"jsonl_keys": [""]}, r"--jsonl-keys names no key"),
    ]
    for inputs, kw, pattern in cases:
        with pytest.raises(PreprocessError, match=pattern):
            run(inputs, tmp_path / "out" / "p", tiny, **kw)
    with pytest.raises(PreprocessError, match="is a folder"):
        run([good], tmp_path / "empty", tiny)
    with pytest.raises(ValueError, match="did you mean 'GPT2BPETokenizer'"):
        preprocess([good], tmp_path / "p", "GPT2BPETokenizr", tiny["vocab"], tiny["merges"])
    with pytest.raises(PreprocessError, match="no document .* has a usable text"):
        run([write_jsonl(tmp_path / "bad.jsonl", [b"{}"])], tmp_path / "p", tiny, max_bad_fraction=1.0)
    assert not (tmp_path / "out").exists() or outputs(tmp_path / "out") == []


def test_command_line_prints_summary_and_progress(tmp_path, tiny, capsys):
    texts = random_texts(30)
    src = write_jsonl(tmp_path / "a.jsonl", docs(texts[:20], "Pile-CC") + [b"oops"] + docs(texts[20:], "Github"))
    pp.main(["--input", str(src), "--output-prefix", str(tmp_path / "p"), "--tokenizer-type",
             "GPT2BPETokenizer", "--vocab-file", tiny["vocab"], "--merge-file", tiny["merges"],
             "--append-eod", "--workers", "1", "--max-bad-fraction", "0.1"])
    out, err = capsys.readouterr()
    assert "30 documents" in out and "docs/s" in out and "tokens/s" in out
    assert "skipped 1 of 31 lines" in out and "invalid_json 1" in out and "p_report.json" in out
    assert "Pile-CC" in out and "Github" in out
    assert "docs/s" in err and "tokens/s" in err  # the tqdm bar's postfix
    with pytest.raises(SystemExit, match=r"preprocess: error: .*missing\.jsonl' does not exist"):
        pp.main(["--input", str(tmp_path / "missing.jsonl"), "--output-prefix", str(tmp_path / "q"),
                 "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", tiny["vocab"]])


def test_expand_inputs_keeps_order_and_sorts_folders(tmp_path):
    for name in ("b.jsonl", "a.jsonl.zst", "c.json.zst"):
        (tmp_path / "d" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "d" / name).write_bytes(b"")
    (tmp_path / "z.jsonl").write_bytes(b"")
    got = expand_inputs([tmp_path / "z.jsonl", tmp_path / "d"])
    assert [p.name for p in got] == ["z.jsonl", "a.jsonl.zst", "b.jsonl", "c.json.zst"]


def test_random_byte_flips_in_a_zst_input_are_counted_or_refused_never_a_crash(tmp_path, tiny):
    """Fuzz: 3 random bit flips per trial in a .jsonl.zst; every outcome is a dataset whose documents plus
    reported skipped lines account for what was read, or a PreprocessError naming the file."""
    texts = random_texts(60, seed=11)
    good = write_jsonl(tmp_path / "good.jsonl.zst", docs(texts), zst_frames=2).read_bytes()
    rng = random.Random(0)
    outcomes = {"dataset": 0, "error": 0}
    for trial in range(25):
        buf = bytearray(good)
        for _ in range(3):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        src = tmp_path / f"flip{trial}.jsonl.zst"
        src.write_bytes(bytes(buf))
        prefix = tmp_path / f"p{trial}"
        try:
            result = run([src], prefix, tiny, max_bad_fraction=1.0)
        except PreprocessError as exc:
            assert str(src) in str(exc)
            assert not Path(f"{prefix}_text_document.idx").exists()  # nothing readable left behind
            outcomes["error"] += 1
            continue
        outcomes["dataset"] += 1
        report = json.loads(Path(f"{prefix}_report.json").read_text())
        assert result["documents"] == len(read_dataset(f"{prefix}_text_document"))
        assert result["documents"] + sum(result["skipped_by_reason"].values()) >= 1
        assert len(report["skipped_lines"]) == sum(result["skipped_by_reason"].values())
    assert sum(outcomes.values()) == 25

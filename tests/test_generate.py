"""`python -m neox_zoology.generate` and `python -m neox_zoology.export` on a tiny trained checkpoint."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from dist import run_ranks
from neox_zoology import export, generate, inference
from neox_zoology.config import build_args


def _train(rank, raw):
    from neox_zoology.training.loop import run

    return run(build_args(raw, world_size=1))


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory):
    """A 3-layer BaseConv (long filter) / sparse_random / attention hybrid trained 4 steps, saved; (config path, save dir)."""
    import yaml

    root = tmp_path_factory.mktemp("gen")
    raw = {"num_layers": 3, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32,
           "attention_config": [[["baseconv", "sparse_random", "attention"], "all"]], "norm": "rmsnorm",
           "activation": "swiglu", "intermediate_size": 384, "pos_emb": "rotary",
           "optimizer": {"type": "Adam", "params": {"lr": 1.0e-2}}, "train_micro_batch_size_per_gpu": 2,
           "train_iters": 4, "seed": 7, "data_path": tiny_corpus["data_prefix"], "split": "90,10,0",
           "tokenizer_type": "SPMTokenizer", "vocab_file": tiny_corpus["tokenizer"],
           "data_cache_path": str(root / "cache"), "eval_iters": 0, "save": str(root / "ckpt"),
           "sparse_random": {"p": 0.5}, "baseconv": {"kernel_sizes": [-1]}}
    run_ranks(_train, 1, raw)
    cfg = root / "run.yml"
    cfg.write_text(yaml.safe_dump(raw))
    return cfg, root / "ckpt"


def test_prompts_are_batched_greedy_and_report_tokens_per_s(trained, capsys):
    cfg, ckpt = trained
    assert generate.main([str(cfg), "--load", str(ckpt), "--prompt", "def f(", "--prompt", "import os",
                          "--max-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert lines[0].startswith("def f(") and lines[-1].startswith("import os")
    assert "tokens/s" in err
    assert generate.main([str(cfg), "--load", str(ckpt), "--prompt", "def f(", "--prompt", "import os",
                          "--max-tokens", "6"]) == 0
    assert capsys.readouterr().out == out  # greedy: the same text again


def test_jsonl_in_and_out_with_sampling(trained, tmp_path):
    cfg, ckpt = trained
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"prompt": "class A"}) + "\n" + json.dumps("for i in") + "\n" + json.dumps("") + "\n")
    args = [str(cfg), "--load", str(ckpt), "--input-file", str(src), "--output-file", str(dst),
            "--temperature", "0.9", "--top-k", "20", "--top-p", "0.95", "--max-tokens", "5", "--seed", "3"]
    assert generate.main(args) == 0
    first = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["prompt"] for r in first] == ["class A", "for i in", ""]
    assert all(1 <= len(r["tokens"]) <= 5 for r in first)
    assert generate.main(args) == 0
    assert [json.loads(line) for line in dst.read_text().splitlines()] == first  # same seed, same samples


def test_stops_at_the_context_limit_of_a_long_filter(trained, tmp_path, capsys):
    cfg, ckpt = trained
    dst = tmp_path / "out.jsonl"
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps("x") + "\n")
    assert generate.main([str(cfg), "--load", str(ckpt), "--input-file", str(src), "--output-file", str(dst),
                          "--max-tokens", "100"]) == 0
    (record,) = [json.loads(line) for line in dst.read_text().splitlines()]
    assert record["stopped_on_eod"] or record["reached_context_limit"]
    assert len(record["tokens"]) <= 32


def test_interactive_reads_prompts_until_an_empty_line(trained, monkeypatch, capsys):
    import io

    cfg, ckpt = trained
    monkeypatch.setattr(sys, "stdin", io.StringIO("def g(\nwhile\n\nnever read\n"))
    assert generate.main([str(cfg), "--load", str(ckpt), "--interactive", "--max-tokens", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("def g(") and out[1].startswith("while") and len(out) == 2


def test_a_bad_input_line_is_one_message(trained, tmp_path, capsys):
    cfg, ckpt = trained
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": 3}\n')
    assert generate.main([str(cfg), "--load", str(ckpt), "--input-file", str(bad)]) == 2
    assert f"{bad}:2" in capsys.readouterr().err


def test_export_round_trip_equals_the_checkpoint(trained, tmp_path):
    _, ckpt = trained
    out = tmp_path / "export"
    assert export.main([str(ckpt), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    a, b = inference.load(ckpt), inference.load(out)
    probe = torch.randint(0, 500, (2, 20), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(b(probe), a(probe), rtol=0, atol=0)
    seeds = [m.selection_seed for m in b.modules() if hasattr(m, "selection_seed")]
    assert seeds and seeds == [m.selection_seed for m in a.modules() if hasattr(m, "selection_seed")]
    la, sa = a.prefill(probe[:, :8])
    lb, sb = b.prefill(probe[:, :8])
    torch.testing.assert_close(b.step(probe[:, 8], sb)[0], a.step(probe[:, 8], sa)[0], rtol=0, atol=0)


def test_export_answers_help_and_refuses_a_non_checkpoint(tmp_path):
    for module in ("neox_zoology.export", "neox_zoology.generate"):
        r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0 and "usage" in r.stdout
    assert export.main([str(tmp_path), str(tmp_path / "out")]) == 2

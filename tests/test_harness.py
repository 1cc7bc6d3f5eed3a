"""The lm-evaluation-harness adapter on a tiny trained checkpoint: local task YAMLs (tests/data/lm_eval)
scored through lm-eval, checked against log-likelihoods and greedy generations computed by hand."""
import json
import math
import os

import pytest
import torch

from conftest import ROOT
from dist import run_ranks
from neox_zoology import inference
from neox_zoology.config import build_args

pytest.importorskip("lm_eval", reason="lm-eval is part of the `eval` extra that make test installs")

from neox_zoology import harness  # noqa: E402
from neox_zoology.tokenizer import build_tokenizer  # noqa: E402

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local task files only: no hub look-ups
TASKS = ROOT / "tests" / "data" / "lm_eval"


def _train(rank, raw):
    from neox_zoology.training.loop import run

    return run(build_args(raw, world_size=1))


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    raw = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 64,
           "attention_config": [[["gated_deltanet", "attention"], "all"]], "norm": "rmsnorm", "activation": "gelu",
           "intermediate_size": 128, "pos_emb": "rotary", "optimizer": {"type": "Adam", "params": {"lr": 1.0e-2}},
           "train_micro_batch_size_per_gpu": 2, "train_iters": 6, "seed": 7, "data_path": tiny_corpus["data_prefix"],
           "split": "90,10,0", "tokenizer_type": "SPMTokenizer", "vocab_file": tiny_corpus["tokenizer"],
           "data_cache_path": str(root / "cache"), "eval_iters": 0, "save": str(root / "ckpt")}
    run_ranks(_train, 1, raw)
    return inference.load(root / "ckpt"), build_tokenizer("SPMTokenizer", tiny_corpus["tokenizer"])


def hand_loglikelihood(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    seq = torch.tensor([ctx + cont])
    logp = model(seq)[0, :, :model.vocab_size].log_softmax(-1)
    rows = logp[len(ctx) - 1:len(ctx) - 1 + len(cont)]
    target = torch.tensor(cont)
    return float(rows[torch.arange(len(cont)), target].sum()), bool((rows.argmax(-1) == target).all())


def hand_greedy(model, ids: list[int], n: int, eod: int) -> list[int]:
    logits, state = model.prefill(torch.tensor([ids]))
    out, nxt = [], int(logits[0, -1, :model.vocab_size].argmax())
    while len(out) < n:
        out.append(nxt)
        if nxt == eod:
            break
        logits, state = model.step(torch.tensor([nxt]), state)
        nxt = int(logits[0, :model.vocab_size].argmax())
    return out


def rows(name):
    return [json.loads(line) for line in (TASKS / name).read_text().splitlines()]


def test_local_tasks_score_as_computed_by_hand(trained, monkeypatch):
    model, tok = trained
    monkeypatch.chdir(ROOT)  # the task YAMLs name their data files relative to the repository
    res = harness.evaluate(model, tok, ["zoo_tiny_ll", "zoo_recall"], [str(TASKS)], batch_size=2)["results"]

    lls = [hand_loglikelihood(model, tok.encode(d["context"]), tok.encode(d["target"])) for d in rows("tiny_ll.jsonl")]
    assert res["zoo_tiny_ll"]["perplexity,none"] == pytest.approx(math.exp(-sum(ll for ll, _ in lls) / len(lls)),
                                                                  rel=1e-4)
    assert res["zoo_tiny_ll"]["acc,none"] == pytest.approx(sum(g for _, g in lls) / len(lls))

    hits = []
    for d in rows("recall.jsonl"):
        new = hand_greedy(model, tok.encode(d["document"] + "\n" + d["question"]), 8, tok.eod)
        text = tok.decode(new[:-1] if new[-1] == tok.eod else new).split("\n")[0]
        hits.append(float(d["answer"].lower() in text.lower()))
    assert res["zoo_recall"]["contains,none"] == pytest.approx(sum(hits) / len(hits))


def test_batched_scores_equal_one_at_a_time_and_rolling_sums_every_token(trained):
    model, tok = trained
    lm = harness.ZooLM(model, tok, batch_size=3)
    pairs = [(tok.encode(d["context"]), tok.encode(d["target"])) for d in rows("tiny_ll.jsonl")]
    batched = lm.score(pairs)
    for (ll, greedy), (ctx, cont) in zip(batched, pairs):
        hand = hand_loglikelihood(model, ctx, cont)
        assert ll == pytest.approx(hand[0], rel=1e-5, abs=1e-4) and greedy == hand[1]

    class Req:
        def __init__(self, *args):
            self.args = args

    short = "x = 1\n"
    ids = tok.encode(short)
    (rolled,) = lm.loglikelihood_rolling([Req(short)])
    assert rolled == pytest.approx(hand_loglikelihood(model, [tok.eod], ids)[0], rel=1e-5, abs=1e-4)
    long_text = rows("tiny_rolling.jsonl")[0]["text"] * 3  # longer than seq_length: several windows
    n = len(tok.encode(long_text))
    assert n > lm.max_length
    (ll,) = lm.loglikelihood_rolling([Req(long_text)])
    assert math.isfinite(ll) and ll < 0
    (text,) = lm.generate_until([Req("name: Ada\ncity:", {"until": ["\n"], "max_gen_toks": 5})])
    assert "\n" not in text


def test_cli_writes_results_and_refuses_an_unknown_task(trained, tmp_path, monkeypatch, tiny_corpus):
    model, _ = trained
    monkeypatch.chdir(ROOT)
    cfg = tmp_path / "tok.yml"
    cfg.write_text(f"tokenizer_type: SPMTokenizer\nvocab_file: {tiny_corpus['tokenizer']}\n")
    out = tmp_path / "res.json"
    assert harness.main([str(cfg), "--load", model.source, "--tasks", "zoo_tiny_rolling", "--include-path",
                         str(TASKS), "--output", str(out)]) == 0
    metrics = json.loads(out.read_text())["results"]["zoo_tiny_rolling"]
    assert metrics["bits_per_byte,none"] > 0
    assert harness.main([str(cfg), "--load", model.source, "--tasks", "no_such_task", "--include-path",
                         str(TASKS)]) == 2

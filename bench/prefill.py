"""Prompt prefill time on CPU: one pass (the mixers' `prefill`) against stepping the prompt token by token.

    python -m bench.prefill [--prompt 2048] [--rows based gla ...] [--out bench/results/prefill.json]

For each layer type a model of `--layers` layers of that type, `--hidden` wide, batch 1, is prefilled with
a `--prompt`-token prompt two ways in the same process: `InferenceModel.prefill` as it is (each mixer's
forward and its state in one pass) and the same prefill with every mixer's state built by stepping the
prompt through `step` from the initial state (how these layer types prefilled before they declared
`prefill`). Both give the same logits and states (checked here, fp32 tolerances); the ratio is stepped
time / one-pass time, measured in the same run.
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import torch

from bench.common import emit, machine

ROWS = ["based", "gla", "gated_deltanet", "mamba", "hyena", "h3", "rwkv"]


def build(row: str, hidden: int, layers: int, heads: int, seq_length: int):
    from neox_zoology import inference, registry
    from neox_zoology.config import build_args

    raw = {"num_layers": layers, "hidden_size": hidden, "num_attention_heads": heads, "seq_length": seq_length,
           "norm": "rmsnorm", "activation": "gelu", "intermediate_size": 4 * hidden, "pos_emb": "rotary",
           "vocab_size": 1024, "train_micro_batch_size_per_gpu": 1, "seed": 1,
           "attention_config": [[[registry.config_name(row)], "all"]]}
    args = build_args(raw, world_size=1)
    args.padded_vocab_size = 1024
    return inference.build(args).eval()


@contextmanager
def stepped_prefill():
    """Inside: every mixer's prompt state is built by stepping (its forward still gives the logits)."""
    from neox_zoology.inference import model as im

    one_pass = im.mixer_prefill

    def stepped(mixer, x, token_ids=None, needs_ids=False):
        out, bias = mixer(x, token_ids=token_ids)
        return out, bias, im._stepped_state(mixer, x, token_ids, needs_ids)

    im.mixer_prefill = stepped
    try:
        yield
    finally:
        im.mixer_prefill = one_pass


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def same(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.allclose(a, b, rtol=1e-3, atol=1e-4 * max(1.0, float(b.abs().amax()) if b.numel() else 0.0))
    if isinstance(a, dict):
        return all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return all(same(x, y) for x, y in zip(a, b))
    return a == b


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.prefill", description=__doc__.splitlines()[0])
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="one-pass timings per row (the median is kept)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    p.add_argument("--md", default=None)
    ns = p.parse_args(argv)
    torch.set_num_threads(ns.threads)
    prompt = torch.randint(0, 1000, (1, ns.prompt), generator=torch.Generator().manual_seed(0))
    results = []
    for row in ns.rows:
        model = build(row, ns.hidden, ns.layers, ns.heads, ns.prompt + 1)
        one_s, (logits, state) = timed(lambda: model.prefill(prompt), ns.repeats)
        with stepped_prefill():
            step_s, (ref_logits, ref_state) = timed(lambda: model.prefill(prompt), 1)
        if not (same(logits, ref_logits) and same(state, ref_state)):
            raise AssertionError(f"{row}: the one-pass prefill differs from the stepped one")
        results.append({"row": row, "prompt": ns.prompt, "one_pass_s": one_s, "stepped_s": step_s,
                        "speedup": step_s / one_s, "prompt_tokens_per_s": ns.prompt / one_s})
    result = {"benchmark": "prefill", "rows": ns.rows, "hidden": ns.hidden, "layers": ns.layers, "heads": ns.heads,
              "prompt": ns.prompt, "results": results, "machine": machine(ns.threads)}
    emit(result, ns.out, ns.md, markdown)
    return result


def markdown(result: dict) -> str:
    lines = ["# Prefill: one pass vs stepping the prompt (CPU)", "",
             f"{result['hidden']} wide, {result['layers']} layers, batch 1, prompt {result['prompt']:,} tokens", "",
             "| layer type | stepped s | one pass s | speedup | prompt tokens/s |", "|---|---|---|---|---|"]
    for r in result["results"]:
        lines.append(f"| {r['row']} | {r['stepped_s']:.2f} | {r['one_pass_s']:.3f} | {r['speedup']:.0f}x | "
                     f"{r['prompt_tokens_per_s']:,.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

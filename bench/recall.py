"""The recall-efficient mixers (Based, GLA, gated DeltaNet, Mamba, Mamba-2) against causal attention on the CPU.

    python -m bench.recall [--hidden 256] [--heads 4] [--seq-len 2048 --seq-len 8192 --seq-len 16384]
                           [--mixers a,b] [--context 8192] [--decode-steps 32] [--out FILE] [--md FILE]

1. Training: forward+backward time and activation memory per (mixer, L), batch 1, fp32, each in a fresh
   subprocess (bench.mixers' measurement: median time, peak RSS over the steps minus the RSS before them);
   `ratio_time` / `ratio_mem` = mixer / attention at the same L. A failed or timed-out measurement
   (attention out of memory or past `--timeout`) is recorded as skipped with its reason.
2. Inference state per sequence (`MixerSpec.state_bytes`, fp32 numbers) of every registered layer type at
   each L and at the decode context: a KV cache grows with L, a recurrence's state does not.
3. Decoding: tokens/s of the one-token `step(x, state)` against attention with a KV cache holding
   `--context` positions (q/k/v/out projections of the same width, SDPA of one query over the cache).
Target (the issue's): chunked forms <= 0.5x attention's forward+backward time at L 8192.
stdout carries only the JSON; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from types import SimpleNamespace

from bench.common import cores, emit, machine
from bench.mixers import run_sub

RECURRENT = ("based", "gla", "gated_deltanet", "mamba", "mamba2")
PEER = "attention"
TARGET_L, TARGET_RATIO = 8192, 0.5


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.recall", description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4: head dim 64 at hidden 256)")
    p.add_argument("--seq-len", type=int, action="append", default=None, dest="seq_len",
                   help="repeatable (default 2048, 8192, 16384)")
    p.add_argument("--mixers", default=",".join(RECURRENT), help="comma-separated recurrent layer types")
    p.add_argument("--repeats", type=int, default=1, help="timed forward+backward steps (default 1)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per training measurement (default 120)")
    p.add_argument("--context", type=int, default=8192, help="decode context length (default 8192)")
    p.add_argument("--decode-steps", type=int, default=32, help="timed one-token steps (default 32)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--out", default=None, metavar="FILE")
    p.add_argument("--md", default=None, metavar="FILE")
    return p.parse_args(argv)


def training(ns, mixers: list[str], threads: int) -> list[dict]:
    sub = SimpleNamespace(hidden=ns.hidden, heads=ns.heads, repeats=ns.repeats, warmup=ns.warmup, timeout=ns.timeout)
    rows = []
    for L in ns.seq_len:
        peer = None
        for name in [PEER, *mixers]:
            print(f"fwd+bwd {name} L={L}", file=sys.stderr, flush=True)
            r = run_sub(name, batch=1, L=L, ns=sub, threads=threads)
            r.setdefault("layer_type", name)
            if "error" in r:  # e.g. killed for memory: the measurement is skipped, saying why
                r["skipped"] = r.pop("error")
            if name == PEER:
                peer = r if "time_s" in r else None
            elif peer is not None and "time_s" in r:
                r["ratio_time"] = r["time_s"] / peer["time_s"]
                if r.get("peak_mem_bytes") and peer.get("peak_mem_bytes"):
                    r["ratio_mem"] = r["peak_mem_bytes"] / peer["peak_mem_bytes"]
            rows.append({k: v for k, v in r.items() if k not in ("times_s", "build_kwargs")})
    return rows


def state_sizes(ns) -> list[dict]:
    from neox_zoology import registry

    out = []
    lengths = sorted({*ns.seq_len, ns.context})
    for name in registry.names():
        spec = registry.get(name)
        shape = registry.Shape(hidden_size=ns.hidden, seq_length=max(lengths), num_attention_heads=ns.heads)
        layers = [0, 1] if spec.per_layer(dict(spec.defaults), 0) != spec.per_layer(dict(spec.defaults), 1) else [0]
        for i in layers:
            args = spec.per_layer(dict(spec.defaults), i)
            row = {"layer_type": name, "layer_index": i,
                   "state_bytes": {str(L): int(spec.state_bytes(shape, args, L)) for L in lengths}}
            row["grows_with_L"] = row["state_bytes"][str(lengths[0])] < row["state_bytes"][str(lengths[-1])]
            out.append(row)
    return out


def _attention_decode(ns, steps: int) -> dict:
    """One query per step against a KV cache of `context` positions (grown by one each step)."""
    import torch
    import torch.nn.functional as F

    d, H, C = ns.hidden, ns.heads, ns.context
    torch.manual_seed(0)
    qkv, out = torch.nn.Linear(d, 3 * d, bias=False), torch.nn.Linear(d, d, bias=False)
    k_cache, v_cache = torch.randn(1, H, C, d // H), torch.randn(1, H, C, d // H)

    def step(x):
        nonlocal k_cache, v_cache
        q, k, v = qkv(x).view(1, 3, H, 1, d // H).unbind(1)
        k_cache, v_cache = torch.cat([k_cache, k], 2), torch.cat([v_cache, v], 2)
        return out(F.scaled_dot_product_attention(q, k_cache, v_cache).reshape(1, d))

    return _time_steps(step, d, steps)


def _time_steps(step, d: int, steps: int) -> dict:
    import torch

    xs = torch.randn(steps + 2, 1, d)
    with torch.no_grad():
        for t in range(2):
            step(xs[t])
        times = []
        for t in range(steps):
            t0 = time.perf_counter()
            step(xs[t + 2])
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"step_s_median": med, "tokens_per_s": 1.0 / med, "steps": steps}


def decoding(ns, mixers: list[str]) -> list[dict]:
    import torch

    from neox_zoology import build_mixer, registry

    rows = [{"layer_type": PEER, "kv_cache_positions": ns.context, **_attention_decode(ns, ns.decode_steps)}]
    for name in mixers:
        print(f"decode {name}", file=sys.stderr, flush=True)
        torch.manual_seed(0)
        m = build_mixer(name, hidden_size=ns.hidden, seq_length=ns.context, num_attention_heads=ns.heads).mixer.eval()
        state = m.initial_state(1, torch.float32)

        def step(x, m=m):
            nonlocal state
            y, state = m.step(x, state)
            return y

        r = {"layer_type": name, **_time_steps(step, ns.hidden, ns.decode_steps)}
        r["speedup_vs_attention"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
        spec = registry.get(name)
        shape = registry.Shape(hidden_size=ns.hidden, seq_length=ns.context, num_attention_heads=ns.heads)
        r["state_bytes"] = int(spec.state_bytes(shape, spec.per_layer(dict(spec.defaults), 0), ns.context))
        rows.append(r)
    return rows


def run(ns) -> dict:
    import torch

    threads = ns.threads or cores()
    torch.set_num_threads(threads)
    ns.seq_len = ns.seq_len or [2048, 8192, 16384]
    mixers = [m for m in ns.mixers.split(",") if m]
    t0 = time.perf_counter()
    train = training(ns, mixers, threads)
    states = state_sizes(ns)
    decode = decoding(ns, mixers)
    targets = [{"mixer": r["mixer"], "seq_len": TARGET_L, "ratio_time": r["ratio_time"], "target": TARGET_RATIO,
                "met": r["ratio_time"] <= TARGET_RATIO}
               for r in train if r["seq_len"] == TARGET_L and "ratio_time" in r]
    return {"benchmark": "recall", "hidden": ns.hidden, "heads": ns.heads, "batch": 1, "dtype": "fp32",
            "training": train, "state_bytes": states, "decode": decode, "context": ns.context,
            "targets": targets, "targets_met": sum(t["met"] for t in targets),
            "targets_missed": sum(not t["met"] for t in targets),
            "seconds": round(time.perf_counter() - t0, 1), "machine": machine(threads)}


def _mib(b) -> str:
    return "—" if b is None else f"{b / 2**20:.1f}"


def markdown(res: dict) -> str:
    lines = [f"# Recall-efficient mixers vs attention (CPU, batch 1, d {res['hidden']}, fp32)", "",
             "| mixer | L | fwd+bwd s | x attention | activation MiB | x attention |", "|---|---:|---:|---:|---:|---:|"]
    for r in res["training"]:
        if "time_s" not in r:
            lines.append(f"| {r['mixer']} | {r['seq_len']} | skipped: {r.get('skipped', '?')} | | | |")
            continue
        rt, rm = r.get("ratio_time"), r.get("ratio_mem")
        lines.append(f"| {r['mixer']} | {r['seq_len']} | {r['time_s']:.3f} | {'' if rt is None else f'{rt:.2f}'} | "
                     f"{_mib(r.get('peak_mem_bytes'))} | {'' if rm is None else f'{rm:.2f}'} |")
    Ls = sorted({L for r in res["state_bytes"] for L in r["state_bytes"]}, key=int)
    lines += ["", "Inference state per sequence per layer (KiB, fp32):", "",
              "| layer type | " + " | ".join(f"L {L}" for L in Ls) + " |", "|---|" + "---:|" * len(Ls)]
    for r in res["state_bytes"]:
        name = r["layer_type"] + (f" (layer {r['layer_index']})" if r["layer_index"] else "")
        lines.append(f"| {name} | " + " | ".join(f"{r['state_bytes'][L] / 1024:.1f}" for L in Ls) + " |")
    lines += ["", f"Decoding at {res['context']} context, one token per step:", "",
              "| mixer | ms / token | tokens/s | x attention |", "|---|---:|---:|---:|"]
    for r in res["decode"]:
        lines.append(f"| {r['layer_type']} | {1e3 * r['step_s_median']:.2f} | {r['tokens_per_s']:.0f} | "
                     f"{r.get('speedup_vs_attention', 1.0):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ns = parse(argv)
    res = run(ns)
    emit(res, ns.out, ns.md, markdown)
    return res


if __name__ == "__main__":
    main()

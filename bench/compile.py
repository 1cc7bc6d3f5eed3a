"""torch.compile of the mixers (`compile: true`): eager vs compiled forward+backward time, compile time.

    python -m bench.compile [--batch 4] [--hidden 512] [--heads 8] [--seq-len 1024] [--mixers a,b,...]
                            [--repeats 3] [--warmup 1] [--threads N] [--no-warm-cache] [--out FILE]

Each mixer is one `build_mixer(name, hidden_size=, seq_length=, num_attention_heads=)` module fed a
[batch, L, hidden] fp32 input that requires grad; one step is `mixer(x).sum().backward()` (as in
bench.mixers). The peer of every compiled row is the same mixer eager, same weights and input, measured
in the same subprocess right before: `ratio` = compiled / eager median step time (< 1: compile helps).

Compiled = `neox_zoology.model.block.compile_mixer` (what `compile: true` does to each block's mixer:
torch.compile, dynamic=False, in place). Its first step traces and compiles the forward and backward
graphs: `compile_s` = that step's time - the median compiled step. Every mixer runs in a fresh
subprocess with a fresh, empty inductor cache of its own (a temporary TORCHINDUCTOR_CACHE_DIR, deleted
afterwards), so `compile_s` is a cold compile. Unless `--no-warm-cache`, a second subprocess then
builds the same mixer against that now-filled cache and times its first compiled step again:
`warm_cache_compile_s` (what a restarted run of the same model pays). `graphs` is the number
of graphs dynamo compiled for the mixer and `graph_breaks` the breaks between them (e.g. around
megatron-core calls or a kernel dynamo does not trace). `max_abs_diff`: output and input gradient of
the compiled step against the eager step. `loadavg_1min_after`: the machine's load after the row (the
noise indicator: with more runnable processes than cores, times are not comparable between rows).

Mixers that declare `supports_compile = False` (or fail to compile) are listed with the reason.
The sparse selection mixers are left out by default (their selection kernel is one hand-written
autograd function with data-dependent shapes).

stdout carries only the JSON; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import cores, emit, loadavg, machine
from bench.mixers import default_variants

ROOT = Path(__file__).resolve().parents[1]

# variant name -> (registered layer type, build_mixer kwargs); as in bench.mixers
VARIANTS = {
    "baseconv_short": ("baseconv", {"layer_index": 0}),
    "baseconv_long": ("baseconv", {"layer_index": 1}),
    "sliding_window": ("sliding_window", {"window": 256}),
}


def spec_of(variant: str):
    return VARIANTS.get(variant, (variant, {}))


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.compile",
                                description="Eager vs torch.compile forward+backward per mixer (JSON on stdout).")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8, help="attention heads (default 8: head dim 64 at hidden 512)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--mixers", default=None, help="comma-separated variants (default: every registered type but the sparse ones, as in bench.mixers)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per measurement (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    p.add_argument("--no-warm-cache", action="store_true", help="skip the warm-cache compile measurement")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per subprocess (default 900)")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the JSON here")
    p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_first-only", action="store_true", dest="first_only", help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.repeats < 1 or ns.warmup < 0 or min(ns.batch, ns.hidden, ns.heads, ns.seq_len) < 1:
        p.error("--repeats, --batch, --hidden, --heads, --seq-len must be >= 1, --warmup >= 0")
    return ns


def measure(variant: str, *, batch: int, hidden: int, heads: int, L: int, repeats: int, warmup: int,
            first_only: bool) -> dict:
    """Eager steps, then the same mixer compiled: first step (with compilation) and steady steps."""
    import copy

    import torch
    from torch._dynamo.utils import counters

    from neox_zoology import build_mixer
    from neox_zoology.model.block import compile_mixer

    name, kwargs = spec_of(variant)
    torch.manual_seed(0)
    eager = build_mixer(name, hidden_size=hidden, seq_length=L, num_attention_heads=heads, **kwargs)
    compiled = copy.deepcopy(eager)
    out = {"mixer": variant, "layer_type": name, "build_kwargs": kwargs}
    if not compile_mixer(compiled.mixer):
        out["skipped"] = f"{type(compiled.mixer).__name__} declares supports_compile = False"
        return out
    x = torch.randn(batch, L, hidden)

    def step(model):
        xx = x.detach().requires_grad_(True)
        y = model(xx)
        y.sum().backward()
        for p in model.parameters():
            p.grad = None
        return y.detach(), xx.grad

    def timed(model, n):
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            step(model)
            ts.append(time.perf_counter() - t0)
        return ts

    if not first_only:
        timed(eager, warmup)
        eager_times = timed(eager, repeats)
    counters.clear()
    t0 = time.perf_counter()
    y_c, gx_c = step(compiled)
    first = time.perf_counter() - t0
    out.update(first_call_s=first, graphs=counters["stats"]["unique_graphs"],
               graph_breaks=sum(counters["graph_break"].values()))
    if first_only:
        return out
    timed(compiled, warmup)
    compiled_times = timed(compiled, repeats)
    y_e, gx_e = step(eager)
    e, c = statistics.median(eager_times), statistics.median(compiled_times)
    out.update(
        eager_time_s=e, compiled_time_s=c, ratio=c / e, compile_s=max(0.0, first - c),
        eager_times_s=eager_times, compiled_times_s=compiled_times,
        max_abs_diff={"output": (y_c - y_e).abs().max().item(), "input_grad": (gx_c - gx_e).abs().max().item()},
    )
    return out


def run_sub(variant: str, ns, threads: int, cache_dir: str, first_only: bool) -> dict:
    cmd = [sys.executable, "-m", "bench.compile", "--_one", variant, "--batch", str(ns.batch), "--hidden",
           str(ns.hidden), "--heads", str(ns.heads), "--seq-len", str(ns.seq_len), "--repeats", str(ns.repeats),
           "--warmup", str(ns.warmup), "--threads", str(threads)] + (["--_first-only"] if first_only else [])
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=ns.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"mixer": variant, "error": f"exceeded the --timeout of {ns.timeout:.0f} s"}
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        return {"mixer": variant, "error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_benchmark(ns) -> dict:
    t_start = time.perf_counter()
    load_start = loadavg()
    threads = ns.threads or cores()
    variants = [v.strip() for v in ns.mixers.split(",") if v.strip()] if ns.mixers else default_variants()
    results = []
    for v in variants:
        print(f"bench.compile: {v} ...", file=sys.stderr, flush=True)
        cache_dir = tempfile.mkdtemp(prefix="bench_compile_inductor_")
        try:
            r = run_sub(v, ns, threads, cache_dir, first_only=False)
            if "compiled_time_s" in r and not ns.no_warm_cache:
                warm = run_sub(v, ns, threads, cache_dir, first_only=True)
                if "first_call_s" in warm:
                    r["warm_cache_compile_s"] = max(0.0, warm["first_call_s"] - r["compiled_time_s"])
        finally:
            shutil.rmtree(cache_dir, ignore_errors=True)
        r["loadavg_1min_after"] = loadavg()
        print(f"bench.compile:   -> eager {r.get('eager_time_s')} s, compiled {r.get('compiled_time_s')} s, "
              f"compile {r.get('compile_s')} s {r.get('skipped', r.get('error', ''))}", file=sys.stderr, flush=True)
        results.append(r)
    timed = [r for r in results if "ratio" in r]
    return {
        "benchmark": "compile",
        "batch": ns.batch,
        "hidden": ns.hidden,
        "attention_heads": ns.heads,
        "seq_len": ns.seq_len,
        "repeats": ns.repeats,
        "warmup": ns.warmup,
        "dtype": "fp32",
        "step": "y = mixer(x); y.sum().backward()  (x [batch, L, hidden] requires grad)",
        "peer": "the same mixer eager (same weights and input), measured in the same subprocess",
        "compiled_with": "neox_zoology.model.block.compile_mixer: torch.compile(dynamic=False), inductor, in place",
        "compile_time": "cold: first compiled step - median compiled step, empty inductor cache; "
                        "warm_cache_compile_s: the same in a new process with the cache filled",
        "results": results,
        "faster_compiled": [r["mixer"] for r in timed if r["ratio"] < 1.0],
        "slower_compiled": [r["mixer"] for r in timed if r["ratio"] >= 1.0],
        "threads": threads,
        "machine": {**machine(threads), "loadavg_1min_at_start": load_start},
        "wall_s": time.perf_counter() - t_start,
    }


def main(argv=None) -> dict:
    ns = parse(argv)
    if ns._one:
        import torch

        torch.set_num_threads(ns.threads or cores())
        r = measure(ns._one, batch=ns.batch, hidden=ns.hidden, heads=ns.heads, L=ns.seq_len, repeats=ns.repeats,
                    warmup=ns.warmup, first_only=ns.first_only)
        print(json.dumps(r), flush=True)
        return r
    result = run_benchmark(ns)
    emit(result, ns.out)
    return result


if __name__ == "__main__":
    main()

"""Forward+backward time and activation memory of every mixer vs causal attention of the same width.

    python -m bench.mixers --batch 4 --hidden 768 --seq-len 2048 [--seq-len 16384 ...]
                           [--mixers a,b,...] [--repeats N] [--threads N] [--out FILE] [--md FILE]

Each (mixer, L) is one `build_mixer(name, hidden_size=, seq_length=, num_attention_heads=)` module
fed a [batch, L, hidden] fp32 input that requires grad; one step is `mixer(x).sum().backward()`.
The time is the median over `--repeats` steps after `--warmup` untimed steps. The peer is the
`attention` mixer itself (causal `F.scaled_dot_product_attention`, `--heads` heads, default 12 =
head dim 64 at hidden 768), measured in the same run at the same (batch, L); `ratio_time` and
`ratio_mem` are mixer / attention.

Variants: baseconv is measured twice, `baseconv_short` (layer_index 0: kernel 3) and `baseconv_long`
(layer_index 1: the implicit long filter); sliding_window uses window 256.

Memory (CPU): every (mixer, L) runs in a fresh subprocess (`python -m bench.mixers --_one ...`), so
neither the allocator state nor the peak of one measurement leaks into another. Inside it, after
imports, model build and input creation, the peak-RSS counter is reset (`/proc/self/clear_refs` 5,
Linux) and the current RSS recorded; `activation_peak_bytes` (= `peak_mem_bytes`) is the peak RSS
over the warm-up and timed steps (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) minus that RSS.
Parameter gradients are set to None between steps, so the peak is one step's activations, saved
tensors, backward temporaries and gradients. The parent also records the child's ru_maxrss via
RUSAGE_CHILDREN as a cross-check. `--no-mem` times everything in this process instead (no memory).

Targets (the Zoology claim for gated convolutions: baseconv short/long, hyena, h3, rwkv, long_conv):
time <= 0.5x attention at L=2048, <= 0.1x at L=16384, and lower activation memory than attention
at L=16384. `--batch-at L=B` runs length L at batch B for BOTH the mixer and its attention peer
(e.g. 16384=1 when attention at batch 4 would take too long); the JSON says so.

FFT check: `fft_causal_conv` vs the straightforward formula (rfft at n = 2L, multiply, irfft,
slice [:L]) on u [batch, hidden, L] with a [hidden, L] filter, forward+backward; target ours/naive
<= 1.0. Ours picks the smallest even 7-smooth n >= 2L, so at power-of-two L both use the same n
and the ratio is noise around 1.0; a non-power-of-two length (`--fft-extra-len`, default 2100) shows
the difference.

stdout carries only the JSON; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import cores, emit, loadavg, machine, maxrss_bytes, reset_peak, rss_bytes

ROOT = Path(__file__).resolve().parents[1]

GATED = ("baseconv_short", "baseconv_long", "hyena", "h3", "rwkv", "long_conv")
TARGET_TIME = {2048: 0.5, 16384: 0.1}
MEM_TARGET_L = 16384
FFT_TARGET = 1.0
PROJECTION = "projection_dxd"
"""Not a mixer: one d x d nn.Linear on the same input. A mixer's `dense_projections` (its projection
weights in units of d x d) times this time is the part of its step that no convolution can remove;
`floor_ratio` = that / attention's time is the lowest ratio the mixer could reach on this machine."""

# variant name -> (registered layer type, build_mixer kwargs)
VARIANTS = {
    "attention": ("attention", {}),
    "baseconv_short": ("baseconv", {"layer_index": 0}),
    "baseconv_long": ("baseconv", {"layer_index": 1}),
    "sliding_window": ("sliding_window", {"window": 256}),
}



def default_variants() -> list[str]:
    from neox_zoology import registry

    out = []
    for name in registry.names():
        if name.startswith("sparse_"):  # selection layers: measured against attention by bench.sparse
            continue
        out += ["baseconv_short", "baseconv_long"] if name == "baseconv" else [name]
    return out


def expand(names: list[str]) -> list[str]:
    out = []
    for n in names:
        n = n.strip()
        if not n:
            continue
        out += ["baseconv_short", "baseconv_long"] if n == "baseconv" else [n]
    return list(dict.fromkeys(out))


def spec_of(variant: str):
    if variant in VARIANTS:
        return VARIANTS[variant]
    return variant, {}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.mixers",
                                description="Mixer forward+backward time and activation memory vs attention (JSON on stdout).")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12, help="attention heads (default 12: head dim 64 at hidden 768)")
    p.add_argument("--seq-len", type=int, action="append", default=None, dest="seq_len",
                   help="sequence length (repeatable; default 2048)")
    p.add_argument("--mixers", default=None,
                   help="comma-separated layer types / variants (default: all registered; baseconv = short and long)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per measurement (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    p.add_argument("--batch-at", action="append", default=[], metavar="L=B",
                   help="use batch B at length L for every mixer and its attention peer (repeatable)")
    p.add_argument("--only-at", action="append", default=[], metavar="L=a,b",
                   help="at length L measure only these mixers (attention always); others get 'skipped'")
    p.add_argument("--skip", action="append", default=[], metavar="MIXER@L=REASON",
                   help="do not measure MIXER at L; record the reason (repeatable)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per subprocess measurement (default 900)")
    p.add_argument("--no-mem", action="store_true", help="time in this process; no memory measurement")
    p.add_argument("--no-fft", action="store_true", help="skip the FFT-conv check")
    p.add_argument("--fft-extra-len", type=int, default=2100,
                   help="non-power-of-two length also used in the FFT check (0: none; default 2100)")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the JSON here")
    p.add_argument("--md", default=None, metavar="FILE", help="also write a Markdown table here")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="combine the results of earlier runs (same hidden/heads; later files win per (mixer, L)), "
                        "recompute ratios and targets, and write --out/--md; nothing is measured")
    p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    ns.seq_len = ns.seq_len or [2048]
    if ns.repeats < 1 or ns.warmup < 0 or ns.batch < 1 or ns.hidden < 1 or any(L < 2 for L in ns.seq_len):
        p.error("--repeats, --batch, --hidden must be >= 1, --warmup >= 0, --seq-len >= 2")
    if ns.threads is not None and ns.threads < 1:
        p.error("--threads must be >= 1")
    try:
        ns.batch_at = {int(a.split("=")[0]): int(a.split("=")[1]) for a in ns.batch_at}
        ns.only_at = {int(a.split("=")[0]): expand(a.split("=", 1)[1].split(",")) for a in ns.only_at}
        skips = {}
        for s in ns.skip:
            key, reason = s.split("=", 1)
            m, L = key.rsplit("@", 1)
            skips[(m, int(L))] = reason
        ns.skip = skips
    except (ValueError, IndexError):
        p.error("--batch-at takes L=B, --only-at L=a,b, --skip MIXER@L=REASON")
    return ns


def measure(variant: str, *, batch: int, hidden: int, heads: int, L: int, repeats: int, warmup: int,
            mem: bool) -> dict:
    """Build one mixer, run warmup + repeats forward+backward steps; times (and memory if `mem`)."""
    import gc

    import torch

    from neox_zoology import build_mixer
    from neox_zoology.parallel import ColumnLinear, RowLinear

    name, kwargs = spec_of(variant)
    torch.manual_seed(0)
    if variant == PROJECTION:
        model = torch.nn.Linear(hidden, hidden)
    else:
        model = build_mixer(name, hidden_size=hidden, seq_length=L, num_attention_heads=heads, **kwargs)
    model.train()
    x = torch.randn(batch, L, hidden, requires_grad=True)
    n_params = sum(p.numel() for p in model.parameters())
    # per-token projections (a filter's position MLP runs once per position, not per token: not counted)
    dense = hidden**2 if variant == PROJECTION else sum(
        m.weight.numel() for n, m in model.named_modules()
        if isinstance(m, (ColumnLinear, RowLinear)) and "filter" not in n.split("."))

    def step():
        y = model(x)
        y.sum().backward()
        del y
        x.grad = None
        for p in model.parameters():
            p.grad = None

    gc.collect()
    reset = reset_peak() if mem else False
    rss_before = rss_bytes() if mem else None
    peak_before = maxrss_bytes() if mem else None
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    out = {"mixer": variant, "layer_type": name, "build_kwargs": kwargs, "batch": batch, "seq_len": L,
           "parameters": n_params, "dense_projections": dense / hidden**2, "time_s": statistics.median(times), "time_s_min": min(times), "times_s": times}
    if mem:
        peak = maxrss_bytes()
        out.update({
            "peak_mem_bytes": max(0, peak - rss_before),
            "rss_before_forward_bytes": rss_before,
            "peak_rss_bytes": peak,
            "peak_rss_before_steps_bytes": peak_before,
            "peak_reset": reset,
        })
    return out


def _one(ns) -> dict:
    import torch

    torch.set_num_threads(ns.threads or cores())
    return measure(ns._one, batch=ns.batch, hidden=ns.hidden, heads=ns.heads, L=ns.seq_len[0],
                   repeats=ns.repeats, warmup=ns.warmup, mem=True)


def run_sub(variant: str, *, batch: int, L: int, ns, threads: int) -> dict:
    cmd = [sys.executable, "-m", "bench.mixers", "--_one", variant, "--batch", str(batch), "--hidden", str(ns.hidden),
           "--heads", str(ns.heads), "--seq-len", str(L), "--repeats", str(ns.repeats), "--warmup", str(ns.warmup),
           "--threads", str(threads)]
    before = maxrss_bytes(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=ns.timeout)
    except subprocess.TimeoutExpired:
        return {"mixer": variant, "batch": batch, "seq_len": L,
                "skipped": f"measurement exceeded the --timeout of {ns.timeout:.0f} s"}
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        return {"mixer": variant, "batch": batch, "seq_len": L,
                "error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    after = maxrss_bytes(resource.RUSAGE_CHILDREN)
    # RUSAGE_CHILDREN is the max over all children so far; it identifies this child only if it rose.
    res["child_maxrss_bytes"] = after if after > before else None
    res["subprocess_wall_s"] = wall
    return res


def fft_check(batch: int, hidden: int, L: int, repeats: int, warmup: int) -> dict:
    import torch

    from neox_zoology.mixers.fftconv import fast_fft_size, fft_causal_conv

    def naive(u, k):
        n = 2 * u.shape[-1]
        y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)
        return y[..., :u.shape[-1]]

    torch.manual_seed(0)
    u = torch.randn(batch, hidden, L, requires_grad=True)
    k = (torch.randn(hidden, L) / L).requires_grad_(True)
    with torch.no_grad():
        err = (fft_causal_conv(u, k) - naive(u, k)).abs().max().item()

    def time_fn(fn):
        def step():
            fn(u, k).sum().backward()
            u.grad = k.grad = None

        for _ in range(warmup):
            step()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            ts.append(time.perf_counter() - t0)
        return ts

    # interleave so that noise lands on both
    ours_t, naive_t = [], []
    for _ in range(2):
        ours_t += time_fn(fft_causal_conv)
        naive_t += time_fn(naive)
    o, n = statistics.median(ours_t), statistics.median(naive_t)
    return {"batch": batch, "hidden": hidden, "seq_len": L, "fft_size_ours": fast_fft_size(2 * L),
            "fft_size_naive": 2 * L, "same_fft_size": fast_fft_size(2 * L) == 2 * L,
            "ours_time_s": o, "naive_time_s": n, "ratio": o / n, "target_ratio": FFT_TARGET,
            "target_met": o / n <= FFT_TARGET, "max_abs_diff": err, "ours_times_s": ours_t, "naive_times_s": naive_t}


def _add_ratios(rows: dict) -> None:
    """ratio_time / ratio_mem against attention, and the projection floor, for the rows of one (L, batch)."""
    att, proj = rows.get("attention", {}), rows.get(PROJECTION, {})
    for v, r in rows.items():
        for key in ("ratio_time", "ratio_mem", "projection_floor_s", "floor_ratio"):
            r.pop(key, None)
        if "time_s" in r and "time_s" in att:
            r["ratio_time"] = r["time_s"] / att["time_s"]
            if "time_s" in proj and v != PROJECTION and "dense_projections" in r:
                r["projection_floor_s"] = r["dense_projections"] * proj["time_s"]
                r["floor_ratio"] = r["projection_floor_s"] / att["time_s"]
        if r.get("peak_mem_bytes") is not None and att.get("peak_mem_bytes"):
            r["ratio_mem"] = r["peak_mem_bytes"] / att["peak_mem_bytes"]


def _targets(rows_by_key: dict, keys: list) -> list[dict]:
    """Target verdicts of the gated convolutions; a key is a length L or an (L, batch) group."""
    out = []
    for key in keys:
        L, batch = key if isinstance(key, tuple) else (key, None)
        rows = rows_by_key.get(key, {})
        where = {"mixer": None, "seq_len": L} if batch is None else {"mixer": None, "seq_len": L, "batch": batch}
        for m in GATED:
            r = rows.get(m)
            if r is None:
                continue
            if L in TARGET_TIME:
                t = {**where, "mixer": m, "kind": "time", "target": f"time <= {TARGET_TIME[L]}x attention"}
                if "ratio_time" in r:
                    t.update(value=r["ratio_time"], met=r["ratio_time"] <= TARGET_TIME[L])
                else:
                    t.update(value=None, met=None, note=r.get("skipped") or r.get("error") or "no attention peer")
                out.append(t)
            if L == MEM_TARGET_L:
                t = {**where, "mixer": m, "kind": "memory", "target": "activation memory < attention"}
                if r.get("ratio_mem") is not None:
                    t.update(value=r["ratio_mem"], met=r["ratio_mem"] < 1.0)
                else:
                    t.update(value=None, met=None, note=r.get("skipped") or r.get("error") or "no memory measured")
                out.append(t)
    return out


def run_benchmark(ns) -> dict:
    import torch

    t_start = time.perf_counter()
    load_start = loadavg()
    threads = ns.threads or cores()
    torch.set_num_threads(threads)
    variants = expand(ns.mixers.split(",")) if ns.mixers else default_variants()
    # the peer goes first, then the d x d projection that gives each mixer's floor
    variants = ["attention", PROJECTION] + [v for v in variants if v not in ("attention", PROJECTION)]

    results = []
    rows_by_L: dict = {}
    for L in ns.seq_len:
        batch = ns.batch_at.get(L, ns.batch)
        rows_by_L[L] = {}
        for v in variants:
            if (v, L) in ns.skip:
                r = {"mixer": v, "batch": batch, "seq_len": L, "skipped": ns.skip[(v, L)]}
            elif L in ns.only_at and v not in ("attention", PROJECTION) and v not in ns.only_at[L]:
                r = {"mixer": v, "batch": batch, "seq_len": L,
                     "skipped": f"not measured at L={L} (only the gated convolutions and attention; --only-at)"}
            else:
                print(f"bench.mixers: {v} L={L} batch={batch} ...", file=sys.stderr, flush=True)
                if ns.no_mem:
                    r = measure(v, batch=batch, hidden=ns.hidden, heads=ns.heads, L=L, repeats=ns.repeats,
                                warmup=ns.warmup, mem=False)
                else:
                    r = run_sub(v, batch=batch, L=L, ns=ns, threads=threads)
                print(f"bench.mixers:   -> time {r.get('time_s')} s, mem {r.get('peak_mem_bytes')} B"
                      f"{' ' + r.get('skipped', r.get('error', '')) if 'time_s' not in r else ''}",
                      file=sys.stderr, flush=True)
            if batch != ns.batch:
                r["batch_note"] = f"batch {batch} at L={L} for this mixer AND its attention peer (--batch-at)"
            r["is_gated_conv"] = v in GATED
            results.append(r)
            rows_by_L[L][v] = r
        _add_ratios(rows_by_L[L])

    fft = []
    if not ns.no_fft:
        fft_lens = list(dict.fromkeys(ns.seq_len + ([ns.fft_extra_len] if ns.fft_extra_len else [])))
        for L in fft_lens:
            print(f"bench.mixers: fft check L={L} ...", file=sys.stderr, flush=True)
            fft.append(fft_check(ns.batch_at.get(L, ns.batch), ns.hidden, L, ns.repeats, max(1, ns.warmup)))

    targets = _targets(rows_by_L, ns.seq_len)
    decided = [t for t in targets if t["met"] is not None]
    return {
        "benchmark": "mixers",
        "batch": ns.batch,
        "batch_at": {str(k): v for k, v in ns.batch_at.items()},
        "hidden": ns.hidden,
        "attention_heads": ns.heads,
        "seq_lens": ns.seq_len,
        "repeats": ns.repeats,
        "warmup": ns.warmup,
        "dtype": "fp32",
        "step": "y = mixer(x); y.sum().backward()  (x [batch, L, hidden] requires grad)",
        "memory": None if ns.no_mem else
        "activation peak = peak RSS during the steps - RSS before the first forward, fresh subprocess per (mixer, L)",
        "peer": "attention (causal F.scaled_dot_product_attention + QKV/out projections + rotary), same run",
        "gated_convolutions": list(GATED),
        "results": results,
        "targets": targets,
        "targets_met": sum(1 for t in decided if t["met"]),
        "targets_missed": sum(1 for t in decided if not t["met"]),
        "targets_undecided": len(targets) - len(decided),
        "fft_check": fft,
        "threads": threads,
        "machine": {**machine(threads), "loadavg_1min_at_start": load_start},
        "wall_s": time.perf_counter() - t_start,
    }


def _per_L(v) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{n} at L={L}" for L, n in v.items())
    return str(v)


def markdown(result: dict) -> str:
    lines = [
        f"# Mixer forward+backward vs attention (hidden {result['hidden']}, {result['attention_heads']} heads, "
        + ("batch per row: each mixer vs attention at the same L and batch"
           if "runs" in result else
           f"batch {result['batch']}{', ' + ', '.join(f'batch {b} at L={L}' for L, b in result['batch_at'].items()) if result['batch_at'] else ''}")
        + ", fp32)",
        "",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, {result['threads']} threads, "
        f"torch {result['machine']['torch']}. Median of timed steps (repeats: {_per_L(result['repeats'])}) after "
        f"untimed warm-up steps ({_per_L(result['warmup'])}). "
        "Activation memory = peak RSS - RSS before the forward, fresh subprocess per row.",
        "",
        "Projection floor = the mixer's dense projection weights (in units of d x d) x the time of one d x d "
        "Linear on the same input, over attention's time: no convolution or recurrence can bring a mixer below it.",
        "",
        "| mixer | L | batch | time s | ratio to attention | projection floor | activation memory MB | ratio | target met |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    tmap = {}
    for t in result["targets"]:
        tmap.setdefault((t["mixer"], t["seq_len"], t.get("batch")), []).append(t)

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    for r in result["results"]:
        if "time_s" not in r:
            lines.append(f"| {r['mixer']} | {r['seq_len']} | {r['batch']} | - | - | - | - | - | "
                         f"{'skipped: ' + r['skipped'] if 'skipped' in r else 'error: ' + r.get('error', '')} |")
            continue
        mem = r.get("peak_mem_bytes")
        marks = []
        for t in tmap.get((r["mixer"], r["seq_len"], r["batch"]), tmap.get((r["mixer"], r["seq_len"], None), [])):
            label = "time" if t["kind"] == "time" else "mem"
            marks.append(f"{label} {'yes' if t['met'] else 'no' if t['met'] is not None else '?'}"
                         + (f" (<= {TARGET_TIME[t['seq_len']]}x)" if t["kind"] == "time" else " (< 1x)"))
        lines.append(
            f"| {r['mixer']} | {r['seq_len']} | {r['batch']} | {r['time_s']:.3f} | {f(r.get('ratio_time'), '.3f')} | "
            f"{f(r.get('floor_ratio'), '.2f')} | {f(None if mem is None else mem / 2**20, '.0f')} | {f(r.get('ratio_mem'), '.3f')} | "
            f"{', '.join(marks) if marks else 'n/a (not a gated conv)' if not r.get('is_gated_conv') else 'n/a'} |")
    if result["fft_check"]:
        lines += ["", "FFT conv check (`fft_causal_conv` vs naive rfft at 2L, forward+backward, target ratio <= 1.0):", "",
                  "| L | batch | FFT size ours / naive | ours s | naive s | ratio | met | max abs diff |",
                  "|---:|---:|---|---:|---:|---:|---|---:|"]
        for c in result["fft_check"]:
            lines.append(f"| {c['seq_len']} | {c['batch']} | {c['fft_size_ours']} / {c['fft_size_naive']} | "
                         f"{c['ours_time_s']:.3f} | {c['naive_time_s']:.3f} | {c['ratio']:.3f} | "
                         f"{'yes' if c['target_met'] else 'no'} | {c['max_abs_diff']:.1e} |")
    lines += ["", f"Targets met: {result['targets_met']}, missed: {result['targets_missed']}, "
                  f"undecided: {result['targets_undecided']}. Wall time {result['wall_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def _run_key(run: dict, L: int) -> str:
    return f"{L} (batch {run.get('batch_at', {}).get(str(L), run['batch'])})"


def merge(paths: list[str]) -> dict:
    """One result from several runs' JSON (e.g. L=2048 and L=16384 run separately)."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    base = dict(runs[0])
    for r in runs[1:]:
        for key in ("hidden", "attention_heads", "dtype"):
            if r[key] != base[key]:
                raise SystemExit(f"--merge: {key} differs between runs ({base[key]} vs {r[key]})")
    # rows are grouped by (L, batch): each mixer is compared with attention at the same length AND batch
    rows, fft, keys = {}, {}, []
    for r in runs:
        for row in r["results"]:
            key = (row["seq_len"], row["batch"])
            rows[key + (row["mixer"],)] = row
            keys.append(key)
        for c in r["fft_check"]:
            fft[(c["seq_len"], c["batch"])] = c
    keys = list(dict.fromkeys(keys))
    Ls = list(dict.fromkeys(k[0] for k in keys))
    rows_by_L = {k: {m: row for (l, b, m), row in rows.items() if (l, b) == k} for k in keys}
    results = [row for k in keys for row in rows_by_L[k].values()]
    for k in keys:
        _add_ratios(rows_by_L[k])
    targets = _targets(rows_by_L, keys)
    decided = [t for t in targets if t["met"] is not None]
    batch_at = {}
    for r in runs:
        batch_at.update(r.get("batch_at", {}))
    base.update(
        seq_lens=Ls, results=results, targets=targets, batch_at=batch_at,
        targets_met=sum(1 for t in decided if t["met"]), targets_missed=sum(1 for t in decided if not t["met"]),
        targets_undecided=len(targets) - len(decided), fft_check=list(fft.values()),
        repeats={_run_key(r, L): r["repeats"] for r in runs for L in r["seq_lens"]},
        warmup={_run_key(r, L): r["warmup"] for r in runs for L in r["seq_lens"]},
        runs=[{"seq_lens": r["seq_lens"], "batch": r["batch"], "batch_at": r.get("batch_at", {}),
               "repeats": r["repeats"], "warmup": r["warmup"], "wall_s": r["wall_s"], "machine": r["machine"]}
              for r in runs],
        wall_s=sum(r["wall_s"] for r in runs),
    )
    return base


def main(argv=None) -> dict:
    ns = parse(argv)
    if ns._one:
        print(json.dumps(_one(ns)), flush=True)
        return {}
    result = merge(ns.merge) if ns.merge else run_benchmark(ns)
    emit(result, ns.out, ns.md, markdown)
    return result


if __name__ == "__main__":
    main()

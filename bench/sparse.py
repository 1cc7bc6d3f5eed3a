"""Sparse-attention layers at a budget of 1/8 of the positions vs full causal attention of the same width.

    python -m bench.sparse --seq-len 2048 8192 [--batch 4] [--hidden 768] [--heads 12]
                           [--budget 0.125] [--repeats N] [--warmup N] [--threads N] [--out FILE] [--md FILE]

Rows, each built with `build_mixer(name, hidden_size=, seq_length=, num_attention_heads=)` and fed a
[batch, L, hidden] fp32 input that requires grad, one step = `layer(x, token_ids=...).sum().backward()`
in training mode:
- `attention`: the peer, causal `F.scaled_dot_product_attention` (+ QKV/out projections, rotary);
- `sparse_random`: p = budget;
- `sparse_programmatic`: token ids built so that exactly round(budget * L) positions repeat an earlier
  token (unique ids elsewhere), `match: token`;
- `sparse_learned`: budget = budget, `train_selection: topk` (exactly k = budget * L per sequence),
  noise 0.01, aux loss on.
Time is the median wall time of the timed steps (`--repeats` per measurement, after `--warmup` untimed
ones); `cpu_s` (process CPU time per step) is reported beside it because the machine may be shared.
Memory is measured as in bench/mixers.py: every (layer, L) runs in a fresh subprocess; peak RSS during
the steps minus RSS before the first forward (parameter gradients freed between steps). With
`--rounds N` (default 2) every length is measured N times in interleaved rounds (all rows, then all
rows again in reverse order), so that a change of machine load does not land on one row only; the
timed steps of all rounds are pooled and the memory is the largest of the rounds. `ratio_time` /
`ratio_mem` are row / attention at the same (L, batch) in the same run. `selected_fraction` is what
the layer selected.

Targets (issue 4): at the largest L measured (8192 in the committed run) time and memory <= 0.35x
attention, and each sparse row's time and memory ratios lower at the largest L than at the smallest.
stdout carries only the JSON; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import cores, emit, loadavg, machine, maxrss_bytes, reset_peak, rss_bytes

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("attention", "sparse_random", "sparse_programmatic", "sparse_learned")
SPARSE = ROWS[1:]
TARGET_RATIO = 0.35


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.sparse",
        description="Sparse attention fwd+bwd time and memory vs full attention (JSON on stdout).")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--seq-len", type=int, nargs="+", action="extend", default=None, dest="seq_len",
                   help="sequence lengths (e.g. --seq-len 2048 8192; default 2048 8192)")
    p.add_argument("--budget", type=float, default=0.125, help="fraction of positions selected (default 1/8)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    p.add_argument("--repeats", type=int, default=2, help="timed steps per measurement (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them (default 1)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved measurement rounds per length (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per subprocess measurement")
    p.add_argument("--no-mem", action="store_true", help="time in this process; no memory measurement")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the JSON here")
    p.add_argument("--md", default=None, metavar="FILE", help="also write a Markdown table here")
    p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    ns.seq_len = ns.seq_len or [2048, 8192]
    ns.rows = [r.strip() for r in ns.rows.split(",") if r.strip()]
    unknown = sorted(set(ns.rows) - set(ROWS))
    if unknown:
        p.error(f"--rows: unknown {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    if min(ns.repeats, ns.rounds, ns.batch, ns.hidden) < 1 or ns.warmup < 0 or any(L < 8 for L in ns.seq_len):
        p.error("--repeats, --rounds, --batch, --hidden must be >= 1, --warmup >= 0, --seq-len >= 8")
    if not 0 < ns.budget <= 1:
        p.error("--budget must be in (0, 1]")
    if ns.hidden % ns.heads:
        p.error("--hidden must divide by --heads")
    return ns


def build_kwargs(row: str, budget: float) -> dict:
    return {"sparse_random": {"p": budget}, "sparse_learned": {"budget": budget, "train_selection": "topk"},
            "sparse_programmatic": {"match": "token"}}.get(row, {})


def repeat_token_ids(batch: int, L: int, fraction: float, seed: int = 0):
    """[batch, L] ids where exactly round(fraction * L) positions (> 0) repeat an earlier token: those
    positions copy the id of an earlier position that keeps its own unique id."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n = min(L - 1, round(fraction * L))
    ids = torch.arange(L).repeat(batch, 1)
    for b in range(batch):
        pos = (torch.randperm(L - 1, generator=g)[:n] + 1).sort().values
        copied = torch.zeros(L, dtype=torch.bool)
        copied[pos] = True
        base = (~copied).nonzero().squeeze(1)  # ascending, starts with position 0
        earlier = torch.searchsorted(base, pos)  # base positions before each copied one (>= 1)
        ids[b, pos] = base[(torch.rand(n, generator=g) * earlier).long()]
    return ids


def measure(row: str, *, batch: int, hidden: int, heads: int, L: int, budget: float, repeats: int, warmup: int,
            mem: bool) -> dict:
    import gc

    import torch

    from neox_zoology import build_mixer
    from neox_zoology.mixers import sparse

    kwargs = build_kwargs(row, budget)
    torch.manual_seed(0)
    model = build_mixer(row, hidden_size=hidden, seq_length=L, num_attention_heads=heads, **kwargs)
    model.train()
    x = torch.randn(batch, L, hidden, requires_grad=True)
    ids = repeat_token_ids(batch, L, budget) if row == "sparse_programmatic" else None

    def step():
        y = model(x, token_ids=ids) if ids is not None else model(x)
        y.sum().backward()
        del y
        x.grad = None
        for p in model.parameters():
            p.grad = None

    gc.collect()
    reset = reset_peak() if mem else False
    rss_before = rss_bytes() if mem else None
    for _ in range(warmup):
        step()
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    out = {"row": row, "build_kwargs": kwargs, "batch": batch, "seq_len": L,
           "parameters": sum(p.numel() for p in model.parameters()),
           "time_s": statistics.median(times), "times_s": times, "cpu_s": statistics.median(cpu), "cpu_times_s": cpu}
    stats = sparse.collect_stats(model, all_ranks=False)
    fraction = [v for k, v in stats.items() if k.endswith("selected_fraction")]
    out["selected_fraction"] = fraction[0] if fraction else None
    if mem:
        peak = maxrss_bytes()
        out.update(peak_mem_bytes=max(0, peak - rss_before), rss_before_forward_bytes=rss_before,
                   peak_rss_bytes=peak, peak_reset=reset)
    return out


def run_sub(row: str, L: int, ns, threads: int) -> dict:
    cmd = [sys.executable, "-m", "bench.sparse", "--_one", row, "--batch", str(ns.batch), "--hidden", str(ns.hidden),
           "--heads", str(ns.heads), "--seq-len", str(L), "--budget", str(ns.budget), "--repeats", str(ns.repeats),
           "--warmup", str(ns.warmup), "--threads", str(threads)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=ns.timeout)
    except subprocess.TimeoutExpired:
        return {"row": row, "batch": ns.batch, "seq_len": L, "skipped": f"exceeded --timeout {ns.timeout:.0f} s"}
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        return {"row": row, "batch": ns.batch, "seq_len": L, "error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["subprocess_wall_s"] = time.perf_counter() - t0
    return res


def pool_rounds(runs: list[dict]) -> dict:
    """One row from its rounds: timed steps pooled (median), the largest memory peak."""
    ok = [r for r in runs if "time_s" in r]
    if not ok:
        return runs[-1]
    out = dict(ok[-1])
    out["times_s"] = [t for r in ok for t in r["times_s"]]
    out["cpu_times_s"] = [t for r in ok for t in r["cpu_times_s"]]
    out["time_s"] = statistics.median(out["times_s"])
    out["cpu_s"] = statistics.median(out["cpu_times_s"])
    out["rounds"] = len(ok)
    mems = [r["peak_mem_bytes"] for r in ok if r.get("peak_mem_bytes") is not None]
    if mems:
        out["peak_mem_bytes"] = max(mems)
        out["peak_mem_bytes_rounds"] = mems
    return out


def add_ratios(results: list[dict]) -> None:
    peers = {(r["seq_len"], r["batch"]): r for r in results if r["row"] == "attention"}
    for r in results:
        att = peers.get((r["seq_len"], r["batch"]), {})
        if "time_s" in r and "time_s" in att:
            r["ratio_time"] = r["time_s"] / att["time_s"]
            r["ratio_cpu"] = r["cpu_s"] / att["cpu_s"]
        if r.get("peak_mem_bytes") is not None and att.get("peak_mem_bytes"):
            r["ratio_mem"] = r["peak_mem_bytes"] / att["peak_mem_bytes"]


def targets(results: list[dict]) -> list[dict]:
    """<= TARGET_RATIO at the largest L; ratio at the largest L below the ratio at the smallest L."""
    Ls = sorted({r["seq_len"] for r in results})
    out = []
    if not Ls:
        return out
    by = {(r["row"], r["seq_len"]): r for r in results}
    for row in SPARSE:
        big = by.get((row, Ls[-1]))
        if big is None:
            continue
        for kind in ("time", "mem"):
            v = big.get(f"ratio_{kind}")
            out.append({"row": row, "seq_len": Ls[-1], "kind": kind, "target": f"{kind} <= {TARGET_RATIO}x attention",
                        "value": v, "met": None if v is None else v <= TARGET_RATIO})
            small = by.get((row, Ls[0]))
            if len(Ls) > 1 and small is not None:
                a, b = small.get(f"ratio_{kind}"), v
                out.append({"row": row, "seq_len": Ls[-1], "kind": f"{kind}_trend",
                            "target": f"{kind} ratio at L={Ls[-1]} < at L={Ls[0]}", "value": [a, b],
                            "met": None if a is None or b is None else b < a})
    return out


def run_benchmark(ns) -> dict:
    import torch

    t_start, load_start = time.perf_counter(), loadavg()
    threads = ns.threads or cores()
    torch.set_num_threads(threads)
    rows = ["attention"] + [r for r in ns.rows if r != "attention"]
    results = []
    for L in ns.seq_len:
        rounds: dict[str, list[dict]] = {row: [] for row in rows}
        for i in range(ns.rounds):
            for row in rows if i % 2 == 0 else rows[::-1]:
                print(f"bench.sparse: {row} L={L} batch={ns.batch} round {i + 1}/{ns.rounds} ...", file=sys.stderr,
                      flush=True)
                if ns.no_mem:
                    r = measure(row, batch=ns.batch, hidden=ns.hidden, heads=ns.heads, L=L, budget=ns.budget,
                                repeats=ns.repeats, warmup=ns.warmup, mem=False)
                else:
                    r = run_sub(row, L, ns, threads)
                print(f"bench.sparse:   -> {r.get('time_s')} s, {r.get('peak_mem_bytes')} B", file=sys.stderr,
                      flush=True)
                rounds[row].append(r)
        results += [pool_rounds(rounds[row]) for row in rows]
    add_ratios(results)
    t = targets(results)
    decided = [x for x in t if x["met"] is not None]
    return {
        "benchmark": "sparse",
        "batch": ns.batch, "hidden": ns.hidden, "attention_heads": ns.heads, "budget": ns.budget,
        "seq_lens": ns.seq_len, "repeats": ns.repeats, "warmup": ns.warmup, "rounds": ns.rounds, "dtype": "fp32",
        "step": "y = layer(x[, token_ids]); y.sum().backward()  (training mode, x [batch, L, hidden] requires grad)",
        "memory": None if ns.no_mem else
        "activation peak = peak RSS during the steps - RSS before the first forward, fresh subprocess per (row, L)",
        "peer": "attention (causal F.scaled_dot_product_attention + QKV/out projections + rotary), same run",
        "results": results,
        "targets": t,
        "targets_met": sum(1 for x in decided if x["met"]),
        "targets_missed": sum(1 for x in decided if not x["met"]),
        "targets_undecided": len(t) - len(decided),
        "threads": threads,
        "machine": {**machine(threads), "loadavg_1min_at_start": load_start},
        "wall_s": time.perf_counter() - t_start,
    }


def markdown(result: dict) -> str:
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = [
        f"# Sparse attention (budget {result['budget']:g}) vs full attention: hidden {result['hidden']}, "
        f"{result['attention_heads']} heads, batch {result['batch']}, fp32, forward+backward",
        "",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, {result['threads']} threads, "
        f"torch {result['machine']['torch']}, load average {result['machine'].get('loadavg_1min_at_start')} at start / "
        f"{result['machine'].get('loadavg_1min_at_end')} at end. Median of {result['repeats']} timed steps x "
        f"{result['rounds']} interleaved rounds, each after {result['warmup']} warm-up step(s); CPU = process CPU time "
        "per step. Memory = peak RSS - RSS before the forward (largest of the rounds), fresh subprocess per row.",
        "",
        "| layer | L | selected | time s | x attention | CPU s | x attention | memory MB | x attention |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["results"]:
        if "time_s" not in r:
            lines.append(f"| {r['row']} | {r['seq_len']} | - | - | - | - | - | - | "
                         f"{r.get('skipped') or r.get('error')} |")
            continue
        mem = r.get("peak_mem_bytes")
        lines.append(
            f"| {r['row']} | {r['seq_len']} | {f(r.get('selected_fraction'), '.3f')} | {r['time_s']:.2f} | "
            f"{f(r.get('ratio_time'), '.3f')} | {r['cpu_s']:.2f} | {f(r.get('ratio_cpu'), '.3f')} | "
            f"{f(None if mem is None else mem / 2**20, '.0f')} | {f(r.get('ratio_mem'), '.3f')} |")
    lines += ["", "Targets:", ""]
    for t in result["targets"]:
        v = t["value"]
        shown = " -> ".join(f(x, ".3f") for x in v) if isinstance(v, list) else f(v, ".3f")
        verdict = "undecided" if t["met"] is None else "met" if t["met"] else "missed"
        lines.append(f"- {t['row']}: {t['target']}: {shown} ({verdict})")
    lines += ["", f"Targets met: {result['targets_met']}, missed: {result['targets_missed']}, "
                  f"undecided: {result['targets_undecided']}. Wall time {result['wall_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ns = parse(argv)
    if ns._one:
        import torch

        torch.set_num_threads(ns.threads or cores())
        print(json.dumps(measure(ns._one, batch=ns.batch, hidden=ns.hidden, heads=ns.heads, L=ns.seq_len[0],
                                 budget=ns.budget, repeats=ns.repeats, warmup=ns.warmup, mem=True)), flush=True)
        return {}
    result = run_benchmark(ns)
    emit(result, ns.out, ns.md, markdown)
    return result


if __name__ == "__main__":
    main()

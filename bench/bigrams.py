"""Bigram counting: training tokens/s on one core and peak memory, against a plain sorted-keys peer.

    python -m bench.bigrams [--eval-bigrams 1000000] [--train-tokens 128000000] [--repeats 2]
                            [--out FILE] [--md FILE]

Data (synthetic, written as megatron-core .bin/.idx in a temporary folder): token ids drawn
independently from a Zipf(1) law over the GPT-2 vocabulary (50257 ids, shuffled ranks). The
evaluation dataset is the shortest prefix of such a stream holding exactly --eval-bigrams distinct
bigrams; the training dataset has --train-tokens tokens. Independent draws are a worst case for
locality (real text repeats its bigrams more), so real data should count at least this fast.

Every measurement runs in a fresh Python subprocess (``--child``) on one thread, so its peak
resident memory (VmHWM) is its own:

- ours: tokenization.bigrams.count_bigrams over all training tokens, and again with
  ``max_train_tokens`` at a quarter of them (peak memory must not follow the training size);
- peer: the straightforward streaming version: the sorted distinct evaluation keys,
  ``np.searchsorted`` of every training pair over them, ``np.bincount`` of the hits; same chunked
  reads, same training data, over the first quarter of it (it is the slow one).

Both report identical counts (checked). Throughput is training tokens over the counting phase's wall
time and over its CPU time (the machine is shared: CPU time is the better measure of the code, wall
time what a user waits); the JSON also has the 1-minute load average. ``ten_billion_tokens_s``
extrapolates the measured rate to 10B training tokens (the Pile under GPT-2 BPE is about 300B; a
model trained on 10B tokens counts 10B), CPU-bound, reading 20 GB of uint16 tokens on top.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import emit, loadavg, machine

VOCAB = 50257
TARGET_TOKENS_PER_S = 20e6
TARGET_PEAK_BYTES = 1 << 30
ROOT = Path(__file__).resolve().parents[1]


def zipf_tokens(rng: np.random.Generator, n: int, ranks: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(1.0 / np.arange(1, VOCAB + 1))
    cdf /= cdf[-1]
    out = np.empty(n, np.uint16)
    block = 1 << 22
    for start in range(0, n, block):
        u = rng.random(min(block, n - start))
        out[start:start + u.size] = ranks[np.minimum(np.searchsorted(cdf, u), VOCAB - 1)]
    return out


def write_tokens(prefix: Path, tokens: np.ndarray, doc_len: int = 1000) -> str:
    from tokenization.preprocess import array_builder_class

    builder = array_builder_class()(str(prefix) + ".bin", np.uint16)
    step = 1 << 24
    for start in range(0, tokens.size, step):
        part = tokens[start:start + step]
        lengths = np.full(-(-part.size // doc_len), doc_len)
        lengths[-1] = part.size - doc_len * (lengths.size - 1)
        builder.add_documents(part, lengths)
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


def make_data(folder: Path, eval_bigrams: int, train_tokens: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    ranks = rng.permutation(VOCAB).astype(np.uint16)
    n = max(1000, eval_bigrams * 4)
    while True:  # grow the stream until it holds enough distinct bigrams
        stream = zipf_tokens(rng, n, ranks)
        keys = stream[:-1].astype(np.int64) * VOCAB + stream[1:]
        _, first = np.unique(keys, return_index=True)
        if first.size >= eval_bigrams:
            break
        n *= 2
    length = int(np.sort(first)[eval_bigrams - 1]) + 2  # the pair at index i spans tokens i, i+1
    eval_prefix = write_tokens(folder / "eval", stream[:length])
    train_prefix = write_tokens(folder / "train", zipf_tokens(rng, train_tokens, ranks))
    return {"eval": eval_prefix, "train": train_prefix, "eval_tokens": length}


IDENTITY = {"type": "SyntheticZipf", "vocab_size": VOCAB, "eod": VOCAB - 1, "files": {}}


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM, which (unlike ru_maxrss) starts afresh at exec
    instead of inheriting the peak of the parent that forked it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(kind: str, train: str, eval_: str, max_train: int | None, chunk_tokens: int | None) -> dict:
    """One measurement in this (fresh) process; returns timings and peak memory."""
    from tokenization import bigrams as bg

    rss_after_imports = peak_rss_bytes()
    train_info, eval_info = bg.dataset_info(train), bg.dataset_info(eval_)
    t0 = time.perf_counter()
    keys, eval_counts, _ = bg.eval_bigrams([eval_info], VOCAB)
    t1 = time.perf_counter()
    limit = train_info.tokens if max_train is None else min(max_train, train_info.tokens)
    chunk = chunk_tokens or bg.CHUNK_TOKENS
    if kind == "ours":
        counter = bg.BigramCounter(keys, VOCAB, priority=eval_counts)
        t2, c2 = time.perf_counter(), time.process_time()
        for part in bg.token_chunks(train_info, chunk, limit):
            counter.update(bg.pair_keys(part, VOCAB, train_info, 0))
        counts = counter.counts()
        structure = counter.nbytes
    else:  # the plain peer: binary search of every pair over the sorted keys
        t2, c2 = time.perf_counter(), time.process_time()
        counts = np.zeros(keys.size, np.int64)
        for part in bg.token_chunks(train_info, chunk, limit):
            pairs = bg.pair_keys(part, VOCAB, train_info, 0)
            pos = np.minimum(np.searchsorted(keys, pairs), keys.size - 1)
            hit = keys[pos] == pairs
            counts += np.bincount(pos[hit], minlength=keys.size)
        structure = keys.nbytes + counts.nbytes
    t3, c3 = time.perf_counter(), time.process_time()
    digest = int(np.dot(counts % 1000003, np.arange(counts.size) % 1009))  # compared across kinds
    return {
        "kind": kind, "train_tokens": limit, "chunk_tokens": chunk, "distinct_eval_bigrams": int(keys.size),
        "eval_seconds": t1 - t0, "build_seconds": t2 - t1, "count_seconds": t3 - t2, "count_cpu_seconds": c3 - c2,
        "tokens_per_s": limit / (t3 - t2), "tokens_per_cpu_s": limit / (c3 - c2),
        "hit_fraction": float(counts.sum() / max(1, limit - 1)), "counts_digest": digest,
        "structure_bytes": int(structure),
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_after_imports_bytes": rss_after_imports,
    }


def run_child(kind: str, data: dict, max_train: int | None, chunk_tokens: int | None) -> dict:
    cmd = [sys.executable, "-m", "bench.bigrams", "--child", kind, "--child-train", data["train"],
           "--child-eval", data["eval"]]
    if max_train is not None:
        cmd += ["--child-max-train", str(max_train)]
    if chunk_tokens is not None:
        cmd += ["--chunk-tokens", str(chunk_tokens)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{kind} measurement failed:\n{done.stderr}")
    return json.loads(done.stdout)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.bigrams", description=__doc__.split("\n\n")[0])
    p.add_argument("--eval-bigrams", type=int, default=1_000_000, help="distinct evaluation bigrams")
    p.add_argument("--train-tokens", type=int, default=128_000_000, help="training tokens")
    p.add_argument("--repeats", type=int, default=2, help="measurements per configuration (median)")
    p.add_argument("--chunk-tokens", type=int, default=None, help="training tokens per step (default: the module's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--md", default=None, help="also write a Markdown summary here")
    p.add_argument("--child", choices=["ours", "peer"], help=argparse.SUPPRESS)
    p.add_argument("--child-train", help=argparse.SUPPRESS)
    p.add_argument("--child-eval", help=argparse.SUPPRESS)
    p.add_argument("--child-max-train", type=int, default=None, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if not ns.child:
        if ns.eval_bigrams < 1 or ns.train_tokens < 8 or ns.repeats < 1:
            p.error("--eval-bigrams >= 1, --train-tokens >= 8 and --repeats >= 1 are needed")
    return ns


def _median(rows: list[dict], key: str) -> float:
    return float(np.median([r[key] for r in rows]))


def run_benchmark(ns: argparse.Namespace) -> dict:
    load_start = loadavg()
    with tempfile.TemporaryDirectory(prefix="bench-bigrams-") as tmp:
        t = time.perf_counter()
        data = make_data(Path(tmp), ns.eval_bigrams, ns.train_tokens, ns.seed)
        data_seconds = time.perf_counter() - t
        quarter = max(2, ns.train_tokens // 4)
        plan = [("ours", None), ("ours", quarter), ("peer", quarter)]
        runs: dict[str, list[dict]] = {f"{kind}_{'all' if m is None else 'quarter'}": [] for kind, m in plan}
        for r in range(ns.repeats):
            for kind, max_train in plan[r % len(plan):] + plan[:r % len(plan)]:  # rotate the order
                runs[f"{kind}_{'all' if max_train is None else 'quarter'}"].append(
                    run_child(kind, data, max_train, ns.chunk_tokens))
    ours_all, ours_q, peer_q = runs["ours_all"], runs["ours_quarter"], runs["peer_quarter"]
    if len({r["counts_digest"] for r in ours_q + peer_q}) != 1:
        raise RuntimeError("ours and the peer disagree on the counts")
    rate = _median(ours_all, "tokens_per_s")
    rate_cpu = _median(ours_all, "tokens_per_cpu_s")
    peak = max(r["peak_rss_bytes"] for r in ours_all + ours_q)
    summary = {
        "ours_tokens_per_s": rate,
        "ours_tokens_per_cpu_s": rate_cpu,
        "peer_tokens_per_s": _median(peer_q, "tokens_per_s"),
        "peer_tokens_per_cpu_s": _median(peer_q, "tokens_per_cpu_s"),
        "ratio_vs_peer": _median(ours_q, "tokens_per_s") / _median(peer_q, "tokens_per_s"),
        "ratio_vs_peer_cpu": _median(ours_q, "tokens_per_cpu_s") / _median(peer_q, "tokens_per_cpu_s"),
        "ours_peak_rss_bytes_all": max(r["peak_rss_bytes"] for r in ours_all),
        "ours_peak_rss_bytes_quarter": max(r["peak_rss_bytes"] for r in ours_q),
        "rss_after_imports_bytes": min(r["rss_after_imports_bytes"] for r in ours_all),
        "counter_structure_bytes": ours_all[0]["structure_bytes"],
        "hit_fraction": ours_all[0]["hit_fraction"],
        "ten_billion_tokens_s": 10e9 / rate,
        "ten_billion_tokens_cpu_s": 10e9 / rate_cpu,
    }
    return {
        "benchmark": "bigrams",
        "data": {"vocab_size": VOCAB, "distribution": "iid Zipf(1), shuffled ranks", "eval_tokens": data["eval_tokens"],
                 "distinct_eval_bigrams": ns.eval_bigrams, "train_tokens": ns.train_tokens,
                 "generation_seconds": round(data_seconds, 1)},
        "repeats": ns.repeats,
        "summary": summary,
        "targets": {"tokens_per_s": TARGET_TOKENS_PER_S, "peak_rss_bytes": TARGET_PEAK_BYTES},
        "target_met": {"tokens_per_s": rate >= TARGET_TOKENS_PER_S,
                       "tokens_per_cpu_s": rate_cpu >= TARGET_TOKENS_PER_S,
                       "peak_rss_bytes": peak < TARGET_PEAK_BYTES},
        "runs": runs,
        "loadavg_1min_at_start": load_start,
        "machine": machine(threads=1),
    }


def markdown(result: dict) -> str:
    s, d = result["summary"], result["data"]
    mb = 1 << 20
    return "\n".join([
        f"# Bigram training counts ({d['distinct_eval_bigrams']:,} distinct evaluation bigrams, "
        f"{d['train_tokens']:,} training tokens, vocab {d['vocab_size']}, {d['distribution']})",
        "",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores shared with other work "
        f"(1-min load {result['loadavg_1min_at_start']} at start, {result['machine']['loadavg_1min_at_end']} at "
        f"end); one thread; median of {result['repeats']} fresh-process runs.",
        "",
        "| | training tokens/s (wall) | per CPU-second | peak RSS MiB |",
        "|---|---:|---:|---:|",
        f"| ours, all training tokens | {s['ours_tokens_per_s'] / 1e6:.1f}M | {s['ours_tokens_per_cpu_s'] / 1e6:.1f}M | "
        f"{s['ours_peak_rss_bytes_all'] / mb:.0f} |",
        f"| ours, a quarter (max_train_tokens) | {_median(result['runs']['ours_quarter'], 'tokens_per_s') / 1e6:.1f}M | "
        f"{_median(result['runs']['ours_quarter'], 'tokens_per_cpu_s') / 1e6:.1f}M | {s['ours_peak_rss_bytes_quarter'] / mb:.0f} |",
        f"| peer (sorted keys + searchsorted + bincount), a quarter | {s['peer_tokens_per_s'] / 1e6:.1f}M | "
        f"{s['peer_tokens_per_cpu_s'] / 1e6:.1f}M | {max(r['peak_rss_bytes'] for r in result['runs']['peer_quarter']) / mb:.0f} |",
        "",
        f"Ours / peer: {s['ratio_vs_peer']:.2f}x (wall), {s['ratio_vs_peer_cpu']:.2f}x (CPU). Counting structure "
        f"{s['counter_structure_bytes'] / mb:.0f} MiB; RSS after imports {s['rss_after_imports_bytes'] / mb:.0f} MiB; "
        f"{100 * s['hit_fraction']:.0f}% of training pairs are evaluation bigrams.",
        f"10B training tokens: {s['ten_billion_tokens_s'] / 60:.1f} min at the wall-clock rate "
        f"({s['ten_billion_tokens_cpu_s'] / 60:.1f} min of CPU), plus reading 20 GB.",
        f"Targets: >= {TARGET_TOKENS_PER_S / 1e6:.0f}M tokens/s: wall {result['target_met']['tokens_per_s']}, "
        f"CPU {result['target_met']['tokens_per_cpu_s']}; peak < 1 GiB: {result['target_met']['peak_rss_bytes']}.",
        "",
    ])


def main(argv=None) -> dict:
    ns = parse(argv)
    if ns.child:
        print(json.dumps(child(ns.child, ns.child_train, ns.child_eval, ns.child_max_train, ns.chunk_tokens)))
        return {}
    result = run_benchmark(ns)
    emit(result, ns.out, ns.md, markdown)
    return result


if __name__ == "__main__":
    main()

"""Cost of the AR-slice evaluation vs a plain validation-loss pass over the same batches.

    python -m bench.ar_eval [--config FILE] [--iters 10] [--rounds 6] [--threads 1] [--out FILE]

Both passes run through the same DeepSpeed engine (built by `build_engine` from the config, 1-rank
gloo group) over the same prebuilt validation batches: "plain" is the training loop's `eval_loss`;
"hook" is `ArSliceHook.slice_sums` + the all-reduce of the sums (per-token NLL from the vocab-parallel
logits, causal AR masks, bigram-count lookups, bucketed sums), i.e. what the hook adds per
evaluation. Writing ar_slice.json, the PNG and the tensorboard scalars is a fixed cost per checkpoint,
reported separately (`write_s`). Batches are Zipf-distributed synthetic tokens with the config's
shape; the bigram table holds `--table-size` entries (a searchsorted lookup, so its size matters
little). Rounds alternate the order (plain first / hook first). `ratio` = hook / plain of the median
wall times (target <= 1.1); `cpu_ratio` is the same for process CPU time, the steadier measure of
the work added when other jobs share the cores (wall times then swing by tens of percent; the JSON
records the load average). `host_work_s_min` times the host-side work the hook adds (masks,
count lookups, bucketed sums) alone, best of several repetitions, and `ratio_estimate_from_min` =
(best plain pass + that work) / best plain pass: the load-robust estimate. stdout carries only the
JSON.

Allocator: by default the measurement re-executes itself with glibc told to keep freed memory
(`MALLOC_TRIM_THRESHOLD_` and `MALLOC_MMAP_THRESHOLD_` at 4 GB, as a GPU's caching allocator keeps
it). Under glibc's default policy freed pages go back to the OS and the next pass faults them in
again, which makes a pass take ~0.48 s or ~0.70 s at random on this model (both passes; the hook's
extra numpy arrays trigger it more often), a bimodal swing larger than the work being measured.
`--malloc default` measures under the default policy; the JSON records which was used.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import emit, loadavg, machine

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "neox" / "demo_cpu.yml"
TARGET_RATIO = 1.1


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.ar_eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--iters", type=int, default=10, help="validation batches per evaluation (ar_eval.iters)")
    p.add_argument("--rounds", type=int, default=6, help="timed rounds (even: the order alternates)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--table-size", type=int, default=2_000_000)
    p.add_argument("--out", default=None)
    p.add_argument("--malloc", choices=("keep", "default"), default="keep",
                   help="keep: glibc keeps freed memory (default; see the module docstring)")
    ns = p.parse_args(argv)
    if ns.iters < 1 or ns.rounds < 2 or ns.rounds % 2:
        p.error("--iters must be >= 1 and --rounds an even number >= 2")
    return ns


def _batches(args, iters: int, vocab: int, seed: int = 0):
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    n = iters * args.gradient_accumulation_steps
    ranks = np.arange(1, vocab + 1)
    p = 1.0 / ranks
    p /= p.sum()
    out = []
    for _ in range(n):
        text = torch.from_numpy(rng.choice(vocab, size=(args.train_micro_batch_size_per_gpu, args.seq_length + 1), p=p))
        out.append((text[:, :-1].contiguous(), (text[:, 1:].contiguous(), torch.ones(text.shape[0], args.seq_length))))
    return out


def run(ns) -> dict:
    import numpy as np
    import torch

    from eval import ar_slice
    from tokenization import bigrams
    from eval.hook import ArSliceHook
    from neox_zoology.config import load
    from neox_zoology.model.gpt import token_nll
    from neox_zoology.parallel import setup as psetup
    from neox_zoology.parallel.cpu_compat import model_parallel_seed
    from neox_zoology.training.engine import build_engine
    from neox_zoology.tokenizer import resolve_vocab
    from neox_zoology.training.loop import eval_loss
    from neox_zoology.training.metrics import Logger

    torch.set_num_threads(ns.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_ar_eval_"))
    rng = np.random.default_rng(1)
    V = ns.vocab_size
    keys = np.unique(rng.integers(0, V * V, size=ns.table_size))
    counts_path = tmp / "bigrams.npz"
    bigrams.save_bigram_counts(counts_path, bigrams.BigramCounts.from_arrays(keys, rng.integers(1, 5000, size=len(keys)), V))
    sets = [f"vocab_size={V}", "vocab_file=null", "merge_file=null", "tensorboard_dir=null", f"save={tmp}",
            "pipe_parallel_size=0", "model_parallel_size=1",
            f"ar_eval={{enabled: true, bigram_counts: {counts_path}, iters: {ns.iters}}}"]
    args = load([ns.config], sets=sets, world_size=1)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    psetup.init_distributed("gloo")
    topo = psetup.init_model_parallel(1, 1)
    try:
        model_parallel_seed(args.seed)
        resolve_vocab(args)
        engine = build_engine(args, topo)
        batches = _batches(args, ns.iters, V)
        device = torch.device("cpu")
        hook = ArSliceHook(args, engine, lambda: iter(batches), Logger(args, 0))
        hook._load_inputs()

        def plain():
            return eval_loss(engine, iter(batches), ns.iters, device)

        def with_slices():
            sums, done, _ = hook.slice_sums()
            return hook._all_reduce(sums), done

        vloss = plain()
        sums, done = with_slices()  # warm-up; also checks both passes see the same tokens and NLL
        doc = ar_slice.summarize(sums)
        times = {"plain": [], "hook": []}
        cpu = {"plain": [], "hook": []}
        for r in range(ns.rounds):
            order = (("plain", plain), ("hook", with_slices)) if r % 2 == 0 else (("hook", with_slices), ("plain", plain))
            for name, fn in order:
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        # The host-side work the hook adds, alone (masks, lookups, bucketed sums), min over repetitions:
        # a load-robust estimate of the overhead, independent of the noisy paired wall times above.
        host_inputs = []
        with torch.no_grad():
            engine.eval()
            for tokens, (labels, mask) in batches:
                nll = token_nll(engine(tokens), labels).double().numpy()
                host_inputs.append((nll, tokens.numpy(), labels.numpy(), mask.numpy()))
            engine.train()
        host = []
        for _ in range(max(5, ns.rounds)):
            t0 = time.perf_counter()
            acc = ar_slice.SliceSums()
            for nll, tok, lab, m in host_inputs:
                acc.add(nll, ar_slice.token_slices(tok, lab, hook.counts, 1250), m)
            host.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            hook._write(doc | {"seconds": 0.0, "iteration": 0}, 0, str(tmp / "global_step0"))
        write_s = time.perf_counter() - t0
        plain_med, hook_med = statistics.median(times["plain"]), statistics.median(times["hook"])
        return {
            "benchmark": "ar_eval",
            "config": str(Path(ns.config).relative_to(ROOT) if Path(ns.config).is_relative_to(ROOT) else ns.config),
            "model": {"num_layers": args.num_layers, "hidden_size": args.hidden_size, "seq_length": args.seq_length,
                      "micro_batch": args.train_micro_batch_size_per_gpu, "layer_types": args.layer_types,
                      "padded_vocab_size": args.padded_vocab_size},
            "iters": ns.iters, "rounds": ns.rounds, "threads": ns.threads, "tokens_per_pass": int(doc["all"]["tokens"]),
            "bigram_table_entries": int(len(keys)),
            "plain_s": times["plain"], "hook_s": times["hook"],
            "plain_s_median": plain_med, "hook_s_median": hook_med,
            "ratio": hook_med / plain_med,
            "ratio_of_min": min(times["hook"]) / min(times["plain"]),
            "plain_cpu_s": cpu["plain"], "hook_cpu_s": cpu["hook"],
            "cpu_ratio": statistics.median(cpu["hook"]) / statistics.median(cpu["plain"]),
            "host_work_s_min": min(host),
            "ratio_estimate_from_min": (min(times["plain"]) + min(host)) / min(times["plain"]),
            "target_ratio": TARGET_RATIO, "target_met": hook_med / plain_med <= TARGET_RATIO,
            "write_s": write_s,
            "malloc": ns.malloc + (" (" + " ".join(f"{k}={v}" for k, v in MALLOC_KEEP.items()) + ")"
                                   if ns.malloc == "keep" else ""),
            "nll_abs_diff_vs_plain": abs(doc["all"]["nll"] - vloss),
            "ar_hit_fraction": doc["ar_hit_fraction"],
            "machine": machine(ns.threads),
        }
    finally:
        psetup.destroy()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MALLOC_KEEP = {"MALLOC_TRIM_THRESHOLD_": "4000000000", "MALLOC_MMAP_THRESHOLD_": "4000000000"}


def main(argv=None) -> dict:
    ns = parse(argv)
    if ns.malloc == "keep" and any(os.environ.get(k) != v for k, v in MALLOC_KEEP.items()):
        # glibc reads these at process start: run the measurement in a child that has them
        cmd = [sys.executable, "-m", "bench.ar_eval", *(sys.argv[1:] if argv is None else argv)]
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **MALLOC_KEEP}, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"bench.ar_eval: the measuring process failed (exit {proc.returncode})")
        result = json.loads(proc.stdout)
        print(proc.stdout, end="")
        return result
    load_start = loadavg()
    with contextlib.redirect_stdout(sys.stderr):
        result = run(ns)
    result["machine"]["loadavg_1min_at_start"] = load_start
    emit(result, ns.out)
    return result


if __name__ == "__main__":
    main()

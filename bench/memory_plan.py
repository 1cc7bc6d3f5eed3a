"""The dry run's memory plan against a real training run on the CPU: estimated vs measured peak memory.

    python -m bench.memory_plan [--config FILE ...] [--set key=value ...] [--steps 3] [--threads N] [--out FILE]

For each case a fresh subprocess trains through our trainer exactly as `train.py` does (`build_engine` +
`train_step` on a 1-rank gloo group, synthetic token batches of the config's shape): fp32, ZeRO 0, the
plain DeepSpeed engine, `--steps` optimizer steps of `gradient_accumulation_steps` micro-batches each.
Measured = peak RSS during model build and training minus the RSS just before the model is built (Linux
`clear_refs` resets the peak there); it holds the parameters, gradients, Adam state, activations and
every temporary, plus whatever the process itself adds (DeepSpeed's engine, Python objects).

The child runs with `MALLOC_MMAP_THRESHOLD_=65536`: glibc then serves every tensor above 64 KiB from its
own mapping and unmaps it when the tensor is freed, so RSS follows the live tensors. With glibc's default
(a threshold that grows up to 32 MiB as large blocks are freed) freed activations of a few MiB stay in
the heap, and its fragments are counted as resident long after the tensors died: the peak RSS then
measures the allocator, not the model (`--default-malloc` adds that measurement to each case; the
caching allocator on a GPU reuses its freed blocks instead).
Estimated = `neox_zoology.training.memory.plan(args, target="cpu")["peak"]`: the same accounting the
dry run prints, with the CPU kernels' saved tensors and no GPU runtime reserve. `ratio` is
measured / estimated; `within_25pct` is |ratio - 1| <= 0.25.

The default cases are the demo config (BaseConv + attention, RMSNorm, SwiGLU, rotary) widened so that
model and activations are hundreds of MB (well above the process noise): one plain, one with
activation checkpointing, one with the chunked LM head. stdout carries only the JSON.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import (MMAP_THRESHOLD, cores, emit, loadavg, machine, maxrss_bytes, reset_peak, rss_bytes,
                          tracking_malloc_env)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/neox/demo_cpu.yml"
BASE_SETS = [
    "vocab_file=null", "vocab_size=8192", "data_path=null", "save=null", "tensorboard_dir=null",
    "bf16={enabled: false}", "fp16={enabled: false}", "zero_optimization={stage: 0}", "pipe_parallel_size=0",
    "model_parallel_size=1", "hidden_size=256", "num_layers=4", "seq_length=512", "max_position_embeddings=512",
    "train_micro_batch_size_per_gpu=8", "gradient_accumulation_steps=2", "train_batch_size=null",
]
CASES = {
    "plain": [],
    "checkpointing": ["checkpoint_activations=true", "checkpoint_num_layers=1"],
    "chunked_head": ["lm_head_chunk_tokens=512"],
}
TOLERANCE = 0.25


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.memory_plan",
                                description="Estimated (dry-run memory plan) vs measured peak memory of CPU training.")
    p.add_argument("--config", action="append", default=None, metavar="FILE",
                   help=f"YAML config(s), merged like train.py (default {DEFAULT_CONFIG} with the sizes in BASE_SETS)")
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                   help="extra key replacements applied to every case")
    p.add_argument("--case", action="append", default=None, choices=sorted(CASES),
                   help="which cases to run (default: all)")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per case (default 2)")
    p.add_argument("--default-malloc", action="store_true",
                   help="also measure each case with glibc's default malloc settings (reported, not compared)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", default=None, metavar="FILE", help="also write the JSON here")
    p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.steps < 1:
        p.error("--steps must be >= 1")
    return ns


def load_args(configs, sets):
    from neox_zoology.config import load
    from neox_zoology.tokenizer import resolve_vocab

    args = load([str(ROOT / c) if not Path(c).is_absolute() else c for c in configs], sets=sets, world_size=1)
    resolve_vocab(args)
    return args


def measure(ns, sets) -> dict:
    """In a fresh process: the peak memory of building the engine and training `ns.steps` steps."""
    import logging
    import warnings

    import torch

    from bench.trainer_overhead import free_port, synthetic_batches

    torch.set_num_threads(ns.threads or cores())
    warnings.filterwarnings("ignore")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    import deepspeed  # noqa: F401  (imports and their memory before the baseline)
    from deepspeed.runtime.engine import DeepSpeedEngine  # noqa: F401

    from neox_zoology.parallel import setup as psetup
    from neox_zoology.parallel.cpu_compat import model_parallel_seed
    from neox_zoology.training.engine import build_engine
    from neox_zoology.training.loop import train_step

    args = load_args(ns.config or [DEFAULT_CONFIG], sets)
    if args.pipe_parallel_size or args.tp != 1 or args.dtype_name != "fp32":
        raise SystemExit("memory_plan: the CPU check runs fp32, pipe_parallel_size 0, model_parallel_size 1")
    device = torch.device("cpu")
    ga = args.gradient_accumulation_steps
    pool = synthetic_batches(ns.steps * ga, args.train_micro_batch_size_per_gpu, args.seq_length,
                             args.vocab_size, 0, device)
    psetup.init_distributed("gloo")
    try:
        psetup.init_model_parallel(1, 1)
        model_parallel_seed(args.seed)
        gc.collect()
        before = rss_bytes()
        reset_peak()
        t0 = time.perf_counter()
        engine = build_engine(args, None)
        built = rss_bytes() - before
        losses = []
        for i in range(ns.steps):
            losses.append(float(train_step(engine, iter(pool[i * ga:(i + 1) * ga]), device)))
        peak = maxrss_bytes() - before
        wall = time.perf_counter() - t0
        n = sum(p.numel() for p in engine.module.parameters())
    finally:
        psetup.destroy()
    return {"rss_before_bytes": before, "after_build_bytes": built, "measured_peak_bytes": peak,
            "losses": losses, "parameters": n, "train_s": wall}


def estimate(configs, sets) -> dict:
    from neox_zoology.training import memory

    args = load_args(configs, sets)
    p = memory.plan(args, target="cpu")
    keys = ("parameters", "gradients", "optimizer", "activations", "transient", "peak", "parameters_count")
    return {**{k: p[k] for k in keys}, "accounting": p["accounting"], "layers": p["layers"]}


def child(ns, configs, sets, case: str, default_malloc: bool = False) -> dict:
    """`measure` in a fresh interpreter (its own peak RSS), with or without the mmap threshold."""
    cmd = [sys.executable, "-m", "bench.memory_plan", "--_one", json.dumps(sets), "--steps", str(ns.steps)]
    cmd += [x for c in configs for x in ("--config", c)]
    cmd += ["--threads", str(ns.threads)] if ns.threads else []
    env = tracking_malloc_env(default_malloc)
    print(f"bench.memory_plan: {case}{' (default malloc)' if default_malloc else ''} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=ns.timeout, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"memory_plan case {case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(ns) -> dict:
    t0, load0 = time.perf_counter(), loadavg()
    configs = ns.config or [DEFAULT_CONFIG]
    rows = []
    for case in ns.case or list(CASES):
        sets = BASE_SETS + CASES[case] + ns.sets
        measured = child(ns, configs, sets, case)
        est = estimate(configs, sets)
        ratio = measured["measured_peak_bytes"] / est["peak"]
        row = {"case": case, "sets": CASES[case] + ns.sets, **measured, "estimate": est,
               "estimated_peak_bytes": est["peak"], "ratio": ratio, "within_25pct": abs(ratio - 1) <= TOLERANCE}
        if ns.default_malloc:
            default = child(ns, configs, sets, case, default_malloc=True)
            row["default_malloc_peak_bytes"] = default["measured_peak_bytes"]
            row["default_malloc_ratio"] = default["measured_peak_bytes"] / est["peak"]
        rows.append(row)
    args = load_args(configs, BASE_SETS + ns.sets)
    return {
        "benchmark": "memory_plan",
        "config": configs, "base_sets": BASE_SETS + ns.sets, "steps": ns.steps,
        "model": {"num_layers": args.num_layers, "hidden_size": args.hidden_size, "seq_length": args.seq_length,
                  "micro_batch": args.train_micro_batch_size_per_gpu,
                  "gradient_accumulation_steps": args.gradient_accumulation_steps,
                  "padded_vocab_size": args.padded_vocab_size, "layer_types": list(args.layer_types),
                  "dtype": args.dtype_name, "zero_stage": 0},
        "malloc": f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}", "tolerance": TOLERANCE, "results": rows,
        "all_within_25pct": all(r["within_25pct"] for r in rows),
        "machine": {**machine(ns.threads or cores()), "loadavg_1min_at_start": load0},
        "wall_s": time.perf_counter() - t0,
    }


def main(argv=None):
    ns = parse(argv)
    if ns._one:
        print(json.dumps(measure(ns, json.loads(ns._one))), flush=True)
        return None
    from bench.trainer_overhead import stdout_to_stderr

    with stdout_to_stderr():  # DeepSpeed prints on stdout; stdout carries the JSON only
        result = run(ns)
    emit(result, ns.out)
    return result


if __name__ == "__main__":
    main()

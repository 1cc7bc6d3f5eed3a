"""Activation checkpointing: step time and activation memory with and without it, same model and batch.

    python -m bench.activation_checkpointing [--config configs/neox/attention_360m.yml ...] [--seq-len 2048]
                                             [--micro-batch 1] [--steps 2] [--rounds 2] [--layers N]
                                             [--lm-head-chunk-tokens 512] [--out FILE]

Three variants per config, all built as `SequentialGPT` (fp32, CPU, one rank, no DeepSpeed) on a
synthetic batch: plain (`checkpoint_activations: false`, whole-logits head), checkpointed
(`checkpoint_activations: true, checkpoint_num_layers: 1`), and checkpointed with the chunked LM head
+ loss (`lm_head_chunk_tokens: N` from `--lm-head-chunk-tokens`; 0 leaves that variant out).

Memory: each variant in a fresh subprocess runs one untimed forward+backward pass, then `--steps`
passes; activation memory = peak RSS during those passes minus the RSS before them (weights and their
gradients from the warm-up pass already resident; Linux `clear_refs` resets the peak). The children run
with `MALLOC_MMAP_THRESHOLD_=65536` (`bench.common.tracking_malloc_env`): with glibc's growing default
threshold the warm-up pass's freed activations stay in the heap, the measured passes reuse them, and a
small model's activation memory reads as zero.

Time: the machine is shared, so a load change between separate processes minutes apart would move a
ratio. One more subprocess per config therefore times all variants on one model, alternating, for
`--rounds` rounds (see `interleaved`); `time_ratio` is the median over rounds of each round's
variant / plain ratio. `time_s` of a row and `time_ratio_separate_runs` come from the separate
processes (`--rounds 0`: `time_ratio` is that one).

The peer of every checkpointed row is the plain row of the same config, measured in the same run:
`time_ratio` and `memory_ratio` are row / plain. `same_loss`: the first loss equals the plain row's,
exactly for the checkpointed row, to 1e-5 relative for the chunked-head row (its sums run in another
order). `--layers` shortens the model (ratios per layer are what checkpointing changes; the JSON says so).

stdout carries only the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import (MMAP_THRESHOLD, cores, emit, loadavg, machine, maxrss_bytes, reset_peak, rss_bytes,
                          tracking_malloc_env)

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = ["configs/neox/attention_360m.yml", "configs/neox/baseconv_360m.yml"]
MEMORY_TARGET, TIME_TARGET = 0.5, 1.4


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.activation_checkpointing",
                                description="Step time and activation memory with/without activation checkpointing.")
    p.add_argument("--config", action="append", default=None)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--layers", type=int, default=None, help="override num_layers (default: the config's)")
    p.add_argument("--lm-head-chunk-tokens", type=int, default=512,
                   help="tokens per LM-head chunk in the third row of each config (0: no such row)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", default=None)
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds of the interleaved timing run per config (0: time_ratio from the separate runs)")
    p.add_argument("--_one", nargs=3, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_interleaved", nargs=2, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build(ns, config: str, ckpt: bool, chunk: int):
    """One gloo rank, the model of `config` (fp32) and a synthetic batch: (args, model, tokens, labels)."""
    import torch

    from neox_zoology.config import load
    from neox_zoology.model.gpt import SequentialGPT
    from neox_zoology.training.engine import model_config
    from neox_zoology.tokenizer import resolve_vocab

    from bench.trainer_overhead import free_port
    from neox_zoology.parallel import setup as psetup
    from neox_zoology.parallel.cpu_compat import model_parallel_seed

    torch.set_num_threads(ns.threads or cores())
    # one gloo rank: megatron-core's checkpoint needs its (CPU-patched) model-parallel RNG tracker
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    psetup.init_distributed("gloo")
    psetup.init_model_parallel(1, 1)
    model_parallel_seed(0)
    sets = ["bf16={enabled: false}", "pipe_parallel_size=0", f"seq_length={ns.seq_len}",
            f"max_position_embeddings={ns.seq_len}", "vocab_file=null", "merge_file=null", "vocab_size=50257",
            f"checkpoint_activations={'true' if ckpt else 'false'}", "checkpoint_num_layers=1",
            f"lm_head_chunk_tokens={chunk}"]
    if ns.layers:
        sets.append(f"num_layers={ns.layers}")
    args = load([str(ROOT / config)], sets=sets, world_size=1)
    resolve_vocab(args)
    torch.manual_seed(0)
    model = SequentialGPT(args, model_config(args))
    model.train()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (ns.micro_batch, ns.seq_len), generator=g)
    labels = (torch.roll(tokens, -1, 1), torch.ones_like(tokens))
    return args, model, tokens, labels


def one(ns, config: str, ckpt: bool, chunk: int = 0) -> dict:
    """One row: memory and time of one variant in a fresh process."""
    import gc

    from neox_zoology.model.gpt import lm_loss

    args, model, tokens, labels = build(ns, config, ckpt, chunk)

    def step():
        loss = lm_loss(model(tokens), labels)
        loss.backward()
        return loss.item()

    first = step()  # warm-up: gradients allocated
    gc.collect()
    reset_peak()
    before = rss_bytes()
    times = []
    for _ in range(ns.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {"config": config, "checkpoint_activations": ckpt, "lm_head_chunk_tokens": chunk,
            "num_layers": args.num_layers,
            "parameters": sum(p.numel() for p in model.parameters()), "first_loss": first,
            "time_s": statistics.median(times), "times_s": times, "activation_bytes": maxrss_bytes() - before,
            "rss_before_bytes": before, "peak_rss_bytes": maxrss_bytes(), "loadavg_1min_at_end": loadavg()}


def interleaved(ns, config: str, chunk: int) -> dict:
    """Step times of all variants on one model in one process, alternating, `--rounds` times.

    The model is built checkpointed (and chunked when chunk > 0); the plain variant switches recompute
    off (`checkpoint_layers = 0`) and the whole-logits variants take `HeadInput.logits()`, the very
    product the unchunked head computes. On a shared machine a load change then hits every variant of a
    round alike: a round's ratios are taken within the round, and the median over rounds is reported.
    """
    from neox_zoology.model.gpt import lm_loss
    from neox_zoology.model.lm_head import HeadInput

    args, model, tokens, labels = build(ns, config, True, chunk)
    recompute = model.checkpoint_layers
    variants = {"plain": (0, False), "checkpointed": (recompute, False)}
    if chunk > 0:
        variants["checkpointed_chunked_head"] = (recompute, True)

    def step(name):
        model.checkpoint_layers, chunked = variants[name]
        out = model(tokens)
        if isinstance(out, HeadInput) and not chunked:
            out = out.logits()
        loss = lm_loss(out, labels)
        loss.backward()
        return loss.item()

    names = list(variants)
    first = {name: step(name) for name in names}  # warm-up of each variant
    times = {name: [] for name in names}
    orders = []
    for r in range(ns.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        orders.append(order)
        for name in order:
            t = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - t)
    ratios = {name: [t / p for t, p in zip(times[name], times["plain"])] for name in names if name != "plain"}
    return {"config": config, "lm_head_chunk_tokens": chunk, "rounds": ns.rounds, "orders": orders,
            "first_loss": first, "times_s": times, "round_time_ratios": ratios,
            "time_ratio": {name: statistics.median(r) for name, r in ratios.items()},
            "loadavg_1min_at_end": loadavg()}


def _subprocess(ns, flag: list, what: str) -> dict:
    cmd = [sys.executable, "-m", "bench.activation_checkpointing", *flag,
           "--seq-len", str(ns.seq_len), "--micro-batch", str(ns.micro_batch), "--steps", str(ns.steps),
           "--rounds", str(ns.rounds)]
    cmd += ["--layers", str(ns.layers)] if ns.layers else []
    cmd += ["--threads", str(ns.threads)] if ns.threads else []
    print(f"bench.activation_checkpointing: {what} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=ns.timeout,
                          env=tracking_malloc_env())
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(ns) -> dict:
    t0, load0 = time.perf_counter(), loadavg()
    rows = []
    variants = [(False, 0), (True, 0)] + ([(True, ns.lm_head_chunk_tokens)] if ns.lm_head_chunk_tokens > 0 else [])
    timings = []
    for config in ns.config or DEFAULTS:
        plain = None
        timing = None
        if ns.rounds > 0:
            timing = _subprocess(ns, ["--_interleaved", config, str(ns.lm_head_chunk_tokens)],
                                 f"{config} interleaved timing")
            timings.append(timing)
        for ckpt, chunk in variants:
            row = _subprocess(ns, ["--_one", config, str(int(ckpt)), str(chunk)],
                              f"{config} checkpoint={ckpt} lm_head_chunk_tokens={chunk}")
            rows.append(row)
            if plain is None:
                plain = row
                continue
            row["time_ratio_separate_runs"] = row["time_s"] / plain["time_s"]
            name = "checkpointed_chunked_head" if chunk else "checkpointed"
            row["time_ratio"] = timing["time_ratio"][name] if timing else row["time_ratio_separate_runs"]
            row["memory_ratio"] = row["activation_bytes"] / plain["activation_bytes"]
            row["time_met"], row["memory_met"] = row["time_ratio"] <= TIME_TARGET, row["memory_ratio"] <= MEMORY_TARGET
            diff = row["first_loss"] - plain["first_loss"]
            row["first_loss_diff"] = diff
            row["same_loss"] = diff == 0 if not chunk else abs(diff) <= 1e-5 * max(1.0, abs(plain["first_loss"]))
    return {"benchmark": "activation_checkpointing", "seq_len": ns.seq_len, "micro_batch": ns.micro_batch,
            "steps": ns.steps, "layers_override": ns.layers, "dtype": "fp32",
            "malloc": f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}",
            "targets": {"memory_ratio": f"<= {MEMORY_TARGET}", "time_ratio": f"<= {TIME_TARGET}"}, "results": rows,
            "rounds": ns.rounds, "interleaved_timing": timings,
            "machine": {**machine(ns.threads or cores()), "loadavg_1min_at_start": load0,
                        "loadavg_1min_at_end": loadavg()},
            "wall_s": time.perf_counter() - t0}


def main(argv=None):
    ns = parse(argv)
    if ns._one:
        print(json.dumps(one(ns, ns._one[0], bool(int(ns._one[1])), int(ns._one[2]))))
        return None
    if ns._interleaved:
        print(json.dumps(interleaved(ns, ns._interleaved[0], int(ns._interleaved[1]))))
        return None
    result = run(ns)
    emit(result, ns.out)
    return result


if __name__ == "__main__":
    main()

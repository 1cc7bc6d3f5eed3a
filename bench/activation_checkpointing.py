"""Activation checkpointing: step time and activation memory with and without it, same model and batch.

    python -m bench.activation_checkpointing [--config configs/neox/attention_360m.yml ...] [--seq-len 2048]
                                             [--micro-batch 1] [--steps 2] [--layers N]
                                             [--lm-head-chunk-tokens 512] [--out FILE]

For each config, fresh subprocesses build the whole model (`SequentialGPT`, fp32, CPU, one rank,
no DeepSpeed) and run `--steps` forward+backward passes on a synthetic batch after one untimed pass:
once as configured with `checkpoint_activations: false`, once with `checkpoint_activations: true,
checkpoint_num_layers: 1`, and once more checkpointed with the chunked LM head + loss
(`lm_head_chunk_tokens: N`, N from `--lm-head-chunk-tokens`; 0 leaves that row out). Activation memory =
peak RSS during the timed passes minus the RSS before them (weights and their gradients from the
warm-up pass already resident; Linux `clear_refs` resets the peak). The peer of every checkpointed row
is the plain row of the same config (not checkpointed, whole-logits head), measured in the same run:
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

from bench.common import cores, loadavg, machine, maxrss_bytes, reset_peak, rss_bytes

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
    p.add_argument("--_one", nargs=3, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def one(ns, config: str, ckpt: bool, chunk: int = 0) -> dict:
    import gc

    import torch

    from neox_zoology.config import load
    from neox_zoology.model.gpt import SequentialGPT, lm_loss
    from neox_zoology.training.engine import model_config
    from neox_zoology.training.loop import resolve_vocab

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

    def step():
        loss = lm_loss(model(tokens), labels)
        loss.backward()
        return float(loss)

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


def run(ns) -> dict:
    t0, load0 = time.perf_counter(), loadavg()
    rows = []
    variants = [(False, 0), (True, 0)] + ([(True, ns.lm_head_chunk_tokens)] if ns.lm_head_chunk_tokens > 0 else [])
    for config in ns.config or DEFAULTS:
        plain = None
        for ckpt, chunk in variants:
            cmd = [sys.executable, "-m", "bench.activation_checkpointing", "--_one", config, str(int(ckpt)), str(chunk),
                   "--seq-len", str(ns.seq_len), "--micro-batch", str(ns.micro_batch), "--steps", str(ns.steps)]
            cmd += ["--layers", str(ns.layers)] if ns.layers else []
            cmd += ["--threads", str(ns.threads)] if ns.threads else []
            what = f"{config} checkpoint={ckpt} lm_head_chunk_tokens={chunk}"
            print(f"bench.activation_checkpointing: {what} ...", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=ns.timeout)
            if proc.returncode != 0:
                raise SystemExit(f"{what} failed: {proc.stderr[-2000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            if plain is None:
                plain = row
                continue
            row["time_ratio"] = row["time_s"] / plain["time_s"]
            row["memory_ratio"] = row["activation_bytes"] / plain["activation_bytes"]
            row["time_met"], row["memory_met"] = row["time_ratio"] <= TIME_TARGET, row["memory_ratio"] <= MEMORY_TARGET
            diff = row["first_loss"] - plain["first_loss"]
            row["first_loss_diff"] = diff
            row["same_loss"] = diff == 0 if not chunk else abs(diff) <= 1e-5 * max(1.0, abs(plain["first_loss"]))
    return {"benchmark": "activation_checkpointing", "seq_len": ns.seq_len, "micro_batch": ns.micro_batch,
            "steps": ns.steps, "layers_override": ns.layers, "dtype": "fp32",
            "targets": {"memory_ratio": f"<= {MEMORY_TARGET}", "time_ratio": f"<= {TIME_TARGET}"}, "results": rows,
            "machine": {**machine(ns.threads or cores()), "loadavg_1min_at_start": load0,
                        "loadavg_1min_at_end": loadavg()},
            "wall_s": time.perf_counter() - t0}


def main(argv=None):
    ns = parse(argv)
    if ns._one:
        print(json.dumps(one(ns, ns._one[0], bool(int(ns._one[1])), int(ns._one[2]))))
        return None
    result = run(ns)
    text = json.dumps(result, indent=1)
    print(text)
    if ns.out:
        Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()

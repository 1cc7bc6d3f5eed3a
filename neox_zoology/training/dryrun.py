"""`--dry-run`: validate, build the whole model on the meta device, count parameters and FLOPs, and
plan the memory of one rank.

No weights are allocated, so a 1.4B config takes seconds on a laptop. Counts are for the whole model
(TP = PP = 1 view); the tied LM head is counted once. The memory plan (`training/memory/`) is per rank
of the busiest pipeline stage at the intended world size (`--world-size N`, else the launcher's
WORLD_SIZE, else model_parallel_size x pipeline stages, i.e. one data-parallel replica): parameters,
gradients, optimizer state and activations in GiB, and whether that fits 40 GB and 80 GB GPUs.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from neox_zoology import flops
from neox_zoology.model.block import ZooBlock
from neox_zoology.model.gpt import SequentialGPT


def summarize(args) -> dict:
    from neox_zoology.training.engine import model_config
    from neox_zoology.training.loop import load_tokenizer, resolve_vocab

    tokenizer = None
    if args.vocab_file and Path(args.vocab_file).exists():
        tokenizer = load_tokenizer(args)
    resolve_vocab(args, tokenizer)
    world, tp = args.world_size, args.model_parallel_size
    args.world_size, args.model_parallel_size = 1, 1  # whole-model view
    try:
        with torch.device("meta"):
            model = SequentialGPT(args, model_config(args, perform_initialization=False))
    finally:
        args.world_size, args.model_parallel_size = world, tp
    by_type: dict[str, int] = {}
    total = 0
    for module in model.layers:
        n = sum(p.numel() for p in module.parameters())
        total += n
        key = module.layer_type if isinstance(module, ZooBlock) else "embedding_and_head"
        by_type[key] = by_type.get(key, 0) + n
    return {
        "parameters": total,
        "parameters_by_layer_type": dict(sorted(by_type.items())),
        "flops_per_token": 3 * flops.model_forward_per_token(args),
        "forward_flops_per_token": flops.model_forward_per_token(args),
        "layer_types": args.layer_types,
        "padded_vocab_size": args.padded_vocab_size,
    }


MEMORY_JSON_KEYS = (
    "world_size", "tp", "pp", "dp", "zero_stage", "dtype", "micro_batch", "seq_length", "checkpoint_activations",
    "checkpoint_group", "lm_head_chunk_tokens", "stage", "parameters_count", "parameters", "gradients", "optimizer",
    "activations", "total", "transient", "runtime_reserve", "peak", "fits", "max_micro_batch",
)


def memory_summary(args) -> dict:
    """The per-rank memory plan (bytes) as the dry run's JSON carries it."""
    from neox_zoology.training import memory

    p = memory.plan(args)
    out = {k: p[k] for k in MEMORY_JSON_KEYS}
    out["stages"] = [{"stage": st["stage"], "layers": st["layers"], "peak": st["peak"]} for st in p["stages"]]
    out["table"] = memory.format_table(p)
    return out


def main(args) -> int:
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    s = summarize(args)
    print(f"layers: {' '.join(s['layer_types'])}")
    print(f"parameters: {s['parameters']:,} ({s['parameters'] / 1e6:.1f}M), vocab padded to {s['padded_vocab_size']}")
    for k, v in s["parameters_by_layer_type"].items():
        print(f"  {k:<20} {v:>15,}")
    print(f"training FLOPs per token (fwd+bwd): {s['flops_per_token']:.4g}")
    out = {k: s[k] for k in ("parameters", "parameters_by_layer_type", "flops_per_token")}
    try:
        mem = memory_summary(args)
    except Exception as exc:  # noqa: BLE001 - the counts above stand; say why the plan is missing
        mem = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"memory plan: not available ({mem['error']})", flush=True)
    else:
        print(mem.pop("table"), flush=True)
    out["memory"] = mem
    print(json.dumps(out))
    return 0

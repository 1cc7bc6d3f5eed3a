"""`--dry-run`: validate, build the whole model on the meta device, count parameters and FLOPs.

No weights are allocated, so a 1.4B config takes seconds on a laptop. Counts are for the whole model
(TP = PP = 1 view); the tied LM head is counted once.
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


def main(args) -> int:
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    s = summarize(args)
    print(f"layers: {' '.join(s['layer_types'])}")
    print(f"parameters: {s['parameters']:,} ({s['parameters'] / 1e6:.1f}M), vocab padded to {s['padded_vocab_size']}")
    for k, v in s["parameters_by_layer_type"].items():
        print(f"  {k:<20} {v:>15,}")
    print(f"training FLOPs per token (fwd+bwd): {s['flops_per_token']:.4g}")
    print(json.dumps({k: s[k] for k in ("parameters", "parameters_by_layer_type", "flops_per_token")}))
    return 0

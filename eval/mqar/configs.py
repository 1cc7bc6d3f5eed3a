"""Named MQAR sweep configurations (docs/mqar.md has the table, why `cpu` is reduced as it is, and cost).

`paper`: Zoology's Figure 2 settings (Appendix E), for a GPU: vocabulary 8192, 100k fixed training
examples and 3k test examples, 64 epochs, batch 512/512/256/128 by length, lr in logspace(-4, -2, 4),
2 layers, AdamW (weight decay 0.1), cosine schedule without warm-up.

`cpu`: a reduced sweep sized for about 90 minutes on 2 CPU cores: vocabulary V = L + 32, lengths
32/64/128 with L/16 pairs, widths 64/128/256, a fresh batch every step, 2,000 steps per run (5,000 at
L=128), early stopping at 99% test accuracy, per-mixer learning rates (a second rate only when the
first misses 99%), and a width is not run for a mixer and length that already reached 99% at a smaller
width. H3 and RWKV are left to `paper` (the slowest mixers on CPU). Cells run in the order that answers
the questions first: attention and the hybrids at d=64 for every length, then BaseConv length by length
over all widths, then Hyena the same way, then the rest.

`smoke`: seconds; used by the tests.
"""
from __future__ import annotations

import copy

GATED_CONVS = ["baseconv", "hyena", "h3"]
RECALL = ["mamba", "based", "gla", "gated_deltanet"]  # the input-dependent recurrences that followed Zoology
ATTENTION_HYBRID = "baseconv+attention"
HYBRID = "baseconv+sparse_programmatic"

PAPER = {
    "vocab_size": 8192,
    "lengths": [[64, 4], [128, 8], [256, 16], [512, 64]],
    "d_models": [64, 128, 256, 512],
    "mixers": ["attention", *GATED_CONVS, "rwkv", ATTENTION_HYBRID, HYBRID],
    "lrs": [1e-4, 4.6415888e-4, 2.1544347e-3, 1e-2],
    "batch_size": {"64": 512, "128": 512, "256": 256, "512": 128},
    "train_examples": 100_000,
    "epochs": 64,
    "test_examples": 3_000,
    "num_layers": 2,
    "weight_decay": 0.1,
    "power_a": 0.01,
    "train_seed": 0,
    "test_seed": 1_000_003,
    "eval_every": 0,
    "target_accuracy": None,
    "position_embeddings": ["attention"],
    "mixer_args": {},
}

CPU = {
    "vocab_size": {"32": 64, "64": 96, "128": 160},  # V = L + 32
    "lengths": [[32, 2], [64, 4], [128, 8]],
    "d_models": [64, 128, 256],
    "mixers": ["attention", "baseconv", "hyena", ATTENTION_HYBRID, HYBRID, *RECALL],
    "lrs": {"default": [1e-3, 3e-3], "baseconv": [3e-3], "hyena": [3e-3],
            ATTENTION_HYBRID: [3e-3, 1e-3], HYBRID: [3e-3, 1e-3]},
    "batch_size": {"32": 64, "64": 64, "128": 32},
    "train_examples": 0,  # 0: a fresh batch every step
    "steps": {"32": 2000, "64": 2000, "128": 5000},
    "test_examples": 500,
    "num_layers": 2,
    "weight_decay": 0.1,
    "power_a": 0.01,
    "train_seed": 0,
    "test_seed": 1_000_003,
    "eval_every": 200,
    "target_accuracy": 0.99,
    "skip_solved_widths": True,
    "position_embeddings": [],
    "mixer_args": {},
    "cell_order": "width",
    "priority": ["baseconv", "hyena"],
}

SMOKE = {
    **CPU,
    "vocab_size": 64,
    "lengths": [[16, 2]],
    "d_models": [16],
    "mixers": ["attention", "baseconv"],
    "lrs": [3e-3],
    "batch_size": {"16": 16},
    "steps": 30,
    "test_examples": 32,
    "eval_every": 15,
}

CONFIGS = {"paper": PAPER, "cpu": CPU, "smoke": SMOKE}


def get(name: str) -> dict:
    if name not in CONFIGS:
        raise ValueError(f"unknown sweep config {name!r}; use one of {', '.join(CONFIGS)}")
    return copy.deepcopy(CONFIGS[name])

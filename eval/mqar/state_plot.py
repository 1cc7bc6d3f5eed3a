"""MQAR accuracy against inference state size: one point per (mixer, width) of sweep results.

A cell's state is the sum over its model's layers of `MixerSpec.state_bytes` (the registry's figure:
a KV cache grows with L, a recurrence does not) at the cell's length, width and recorded layer sections,
so the plot needs no per-mixer knowledge here. Points whose sweep set non-default keys
(`mixer_args`, e.g. a short-conv ablation) are labelled with them.
"""
from __future__ import annotations

import json
from pathlib import Path

from neox_zoology.io import atomic_write_json


def cell_state_bytes(cell: dict) -> int:
    """Inference state of the cell's 2-layer MQAR model (one head, as eval.mqar.model builds it)."""
    from eval.mqar.model import parse_pattern
    from neox_zoology import registry

    settings = cell["settings"]
    seen: dict[str, int] = {}
    total = 0.0
    shape = registry.Shape(hidden_size=cell["d_model"], seq_length=cell["seq_len"], num_attention_heads=1)
    for t in parse_pattern(cell["pattern"], settings["num_layers"]):
        spec = registry.get(t)
        args = settings["layer_args"].get(t) or registry.resolve_args(t, settings["mixer_args"].get(t))
        total += spec.state_bytes(shape, spec.per_layer(dict(args), seen.get(t, 0)), cell["seq_len"])
        seen[t] = seen.get(t, 0) + 1
    return int(total)


def label(cell: dict) -> str:
    extra = {t: a for t, a in cell["settings"]["mixer_args"].items() if a}
    if not extra:
        return cell["pattern"]
    return cell["pattern"] + " (" + ", ".join(f"{k}={v}" for a in extra.values() for k, v in a.items()) + ")"


def points(paths, seq_len: int) -> list[dict]:
    """Every finished cell at `seq_len` in the result files, with the layer sections it recorded (later files
    win on the same label and width)."""
    out: dict[tuple, dict] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        for cell in data.get("cells", {}).values():
            if cell["seq_len"] != seq_len:
                continue
            p = {"mixer": label(cell), "pattern": cell["pattern"], "d_model": cell["d_model"], "seq_len": seq_len,
                 "kv_pairs": cell["kv_pairs"], "accuracy": cell["best_accuracy"],
                 "state_bytes": cell_state_bytes(cell), "source": str(path)}
            out[p["mixer"], p["d_model"]] = p
    return sorted(out.values(), key=lambda p: (p["mixer"], p["d_model"]))


def plot(paths, out_png, out_json=None, seq_len: int = 64) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = points(paths, seq_len)
    if not pts:
        raise ValueError(f"no finished cells at seq_len {seq_len} in {', '.join(map(str, paths))}; run a sweep first")
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^vP*Xh<>"
    for i, name in enumerate(dict.fromkeys(p["mixer"] for p in pts)):
        mine = [p for p in pts if p["mixer"] == name]
        ax.plot([p["state_bytes"] for p in mine], [p["accuracy"] for p in mine], marker=markers[i % len(markers)],
                color=colors[i % len(colors)], linestyle="-" if len(mine) > 1 else "none", alpha=0.85, label=name)
        for p in mine:
            ax.annotate(f"d{p['d_model']}", (p["state_bytes"], p["accuracy"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel(f"inference state per sequence, bytes (fp32, both layers, L = {seq_len})")
    ax.set_ylabel("MQAR test accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"MQAR recall vs state size (L {seq_len}, {pts[0]['kv_pairs']} KV pairs)")
    fig.tight_layout(rect=(0, 0, 0.72, 1))
    fig.legend(fontsize=7, loc="center right", frameon=False)
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    result = {"seq_len": seq_len, "sources": [str(p) for p in paths], "points": pts}
    if out_json:
        atomic_write_json(Path(out_json), result)
    return result

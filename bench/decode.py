"""Decode speed and state memory vs context length: attention vs BaseConv vs gated DeltaNet (CPU).

    python -m bench.decode [--contexts 1024 ... 32768] [--out bench/results/decode.json] [--png ...]

Each row is a model of the same depth and width whose MLP width is chosen so that all rows have about the
same parameter count (attention's). For each context L the decoding state of L positions is built, then
`--steps` one-token steps are timed (batch `--batch`): tokens/s, and the state's bytes
(`inference.state_bytes`). The state is grown to L positions from two real prefills (16 and 32 tokens):
the tensors' dimensions that grow with the prompt are extended to L with values of the same scale, the
position counters set to L; a step's cost depends on the state's size, not its values (a real 32K
prefill of the attention model would take most of the time budget). Ratios are against attention at the
same L, measured in the same run. Rows: `baseconv` = short filters only (kernel_sizes [3]), the fixed-size
gated convolution; `baseconv_long` = the paper's [3, -1] (its long filter keeps the input history).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import emit, machine

ROWS = {
    "attention": {"attention_config": [[["attention"], "all"]]},
    "baseconv": {"attention_config": [[["baseconv"], "all"]], "baseconv": {"kernel_sizes": [3]}},
    "baseconv_long": {"attention_config": [[["baseconv"], "all"]], "baseconv": {"kernel_sizes": [3, -1]}},
    "gated_deltanet": {"attention_config": [[["gated_deltanet"], "all"]]},
}


def build(row: str, hidden: int, layers: int, heads: int, ffn: int, seq_length: int):
    from neox_zoology import inference
    from neox_zoology.config import build_args

    raw = {"num_layers": layers, "hidden_size": hidden, "num_attention_heads": heads, "seq_length": seq_length,
           "norm": "rmsnorm", "activation": "gelu", "intermediate_size": ffn, "pos_emb": "rotary",
           "vocab_size": 1024, "train_micro_batch_size_per_gpu": 1, "seed": 1, **ROWS[row]}
    args = build_args(raw, world_size=1)
    args.padded_vocab_size = 1024
    return inference.build(args).eval()


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def matched(row: str, target: int | None, hidden: int, layers: int, heads: int, seq_length: int):
    """The row's model with the MLP width (a multiple of 8) whose parameter count is closest to `target`
    (None: the usual 4 x hidden). Parameters grow linearly with the MLP width: two builds give the line."""
    if target is None:
        return build(row, hidden, layers, heads, 4 * hidden, seq_length), 4 * hidden
    a, b = (n_params(build(row, hidden, layers, heads, w, seq_length)) for w in (64, 128))
    ffn = max(8, round((64 + (target - a) * 64 / (b - a)) / 8) * 8)
    return build(row, hidden, layers, heads, ffn, seq_length), ffn


def grow(small, large, n_small: int, n_large: int, L: int, g: torch.Generator):
    """A state of L positions from the states after n_small and n_large positions (see the module docstring)."""
    if isinstance(small, dict):
        return {k: grow(small[k], large[k], n_small, n_large, L, g) for k in small}
    if isinstance(small, (list, tuple)):
        return type(small)(grow(a, b, n_small, n_large, L, g) for a, b in zip(small, large))
    if isinstance(small, int) and not isinstance(small, bool) and (small, large) == (n_small, n_large):
        return L
    if torch.is_tensor(small) and small.shape != large.shape:
        dims = [i for i, (a, b) in enumerate(zip(small.shape, large.shape)) if a != b]
        if len(dims) != 1 or large.shape[dims[0]] - small.shape[dims[0]] != n_large - n_small:
            raise ValueError(f"a state tensor grows as {tuple(small.shape)} -> {tuple(large.shape)}: not one "
                             f"dimension per position")
        shape = list(large.shape)
        shape[dims[0]] = L - n_large + large.shape[dims[0]]
        if large.is_complex():
            return torch.randn(shape, dtype=large.dtype, generator=g) * large.abs().std()
        return torch.randn(shape, dtype=large.dtype, generator=g) * large.float().std().to(large.dtype)
    return large


def measure(model, L: int, batch: int, steps: int, warmup: int) -> dict:
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 1000, (batch, 32), generator=g)
    _, s16 = model.prefill(prompt[:, :16])
    _, s32 = model.prefill(prompt)
    state = grow(s16, s32, 16, 32, L, g)
    from neox_zoology.inference import state_bytes

    tok = torch.randint(0, 1000, (batch,), generator=g)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        logits, _ = model.step(tok, state)  # always from the L-position state: every timed step sees context L
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    return {"context": L, "step_s": step_s, "tokens_per_s": batch / step_s, "state_bytes": state_bytes(state)}


def markdown(result: dict) -> str:
    lines = ["# Decode speed and state memory vs context (CPU)", "",
             f"{result['hidden']} wide, {result['layers']} layers, batch {result['batch']}; parameters per row: "
             + ", ".join(f"{r} {p:,}" for r, p in result["params"].items()), "",
             "| row | context | tokens/s | vs attention | state MiB | vs attention |", "|---|---|---|---|---|---|"]
    for r in result["results"]:
        lines.append(f"| {r['row']} | {r['context']:,} | {r['tokens_per_s']:.1f} | {r['ratio_tokens_per_s']:.2f} | "
                     f"{r['state_bytes'] / 2**20:.3f} | {r['ratio_state']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for row in result["rows"]:
        rs = [r for r in result["results"] if r["row"] == row]
        a.plot([r["context"] for r in rs], [r["tokens_per_s"] for r in rs], marker="o", label=row)
        b.plot([r["context"] for r in rs], [r["state_bytes"] / 2**20 for r in rs], marker="o", label=row)
    for ax, title in ((a, "decode tokens/s"), (b, "decoding state (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    a.legend()
    fig.suptitle(f"CPU decode, {result['hidden']} wide x {result['layers']} layers, same parameter count")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    p.add_argument("--md", default=None)
    p.add_argument("--png", default=None)
    ns = p.parse_args(argv)
    torch.set_num_threads(ns.threads)
    seq_length = max(ns.contexts) + 1
    models, params, widths, target = {}, {}, {}, None
    for row in ns.rows:
        model, ffn = matched(row, target, ns.hidden, ns.layers, ns.heads, seq_length)
        target = target or n_params(model)
        models[row], params[row], widths[row] = model, n_params(model), ffn
    results = []
    with torch.no_grad():
        for L in ns.contexts:
            for row in ns.rows:
                results.append({"row": row, **measure(models[row], L, ns.batch, ns.steps, ns.warmup)})
    for r in results:
        peer = next((x for x in results if x["row"] == ns.rows[0] and x["context"] == r["context"]), r)
        r["ratio_tokens_per_s"] = r["tokens_per_s"] / peer["tokens_per_s"]
        r["ratio_state"] = r["state_bytes"] / peer["state_bytes"]
    result = {"benchmark": "decode", "rows": ns.rows, "peer": ns.rows[0], "hidden": ns.hidden, "layers": ns.layers,
              "heads": ns.heads, "batch": ns.batch, "steps": ns.steps, "params": params, "mlp_widths": widths,
              "results": results, "machine": machine(ns.threads)}
    if ns.png:
        plot(result, ns.png)
    emit(result, ns.out, ns.md, markdown)
    return result


if __name__ == "__main__":
    main()

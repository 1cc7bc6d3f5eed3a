"""MQAR sweep: train a 2-layer model per (mixer pattern, length, width, learning rate), keep the best
test accuracy per cell, write JSON (resumable: every finished cell is cached in it) and a Figure-2
style plot (accuracy vs model dimension, one panel per sequence length, one line per mixer)."""
from __future__ import annotations

import json
import math
import os
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from eval.mqar.data import MQARConfig, generate
from neox_zoology.io import atomic_write_json

def cell_settings(cfg: dict, pattern: str, seq_len: int) -> dict:
    """Everything that determines a cell's numbers besides (pattern, L, kv, d) and the learning rates.
    A cached cell is reused only when these match."""
    fixed = int(cfg.get("train_examples") or 0)
    types = pattern.split("+")
    return {
        "vocab_size": by_length(cfg, "vocab_size", seq_len), "batch_size": by_length(cfg, "batch_size", seq_len),
        "train_examples": fixed, "epochs": cfg.get("epochs") if fixed else None,
        "steps": None if fixed else by_length(cfg, "steps", seq_len), "test_examples": cfg["test_examples"],
        "num_layers": cfg["num_layers"], "weight_decay": cfg["weight_decay"], "power_a": cfg["power_a"],
        "train_seed": cfg["train_seed"], "test_seed": cfg["test_seed"], "eval_every": cfg.get("eval_every"),
        "target_accuracy": cfg.get("target_accuracy"),
        "position_embeddings": pattern in cfg.get("position_embeddings", ()),
        "mixer_args": {t: (cfg.get("mixer_args") or {}).get(t, {}) for t in types},
        "layer_args": {t: layer_args(cfg, t) for t in types},
    }


def layer_args(cfg: dict, layer_type: str) -> dict:
    """The layer's whole section as the sweep builds it: the registry's defaults (which carry the switches
    that select the math and the initialisation) under the config's `mixer_args`. Recorded per cell, so a
    cell computed before a default changed is recomputed rather than reused."""
    from neox_zoology import registry

    try:
        spec = registry.get(layer_type)
    except KeyError:  # an unregistered name: parse_pattern reports it when the cell runs
        return {}
    return {**dict(spec.defaults), **(cfg.get("mixer_args") or {}).get(layer_type, {})}


def cell_key(pattern: str, seq_len: int, kv: int, d: int) -> str:
    return f"{pattern}|L{seq_len}|kv{kv}|d{d}"


def registered(pattern: str) -> bool:
    from eval.mqar.model import parse_pattern

    try:
        parse_pattern(pattern, 1 + pattern.count("+"))
        return True
    except ValueError:
        return False


def by_length(cfg: dict, key: str, seq_len: int) -> int:
    """A per-length setting: one int, or a mapping {"64": ..., "128": ...}."""
    v = cfg[key]
    if isinstance(v, dict):
        if str(seq_len) not in v:
            raise ValueError(f"{key} has no entry for seq_len {seq_len}: {v}; add one")
        return int(v[str(seq_len)])
    return int(v)


def run_device(cfg: dict) -> torch.device:
    """`device` of the sweep: "cpu", "cuda[:N]", or "auto" (CUDA when available, else the CPU; default "cpu")."""
    name = cfg.get("device") or "cpu"
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def train_one(cfg: dict, pattern: str, seq_len: int, kv: int, d: int, lr: float, log=None) -> dict:
    """Train one run; returns its test accuracy history and the final accuracy. Batches are generated on
    the CPU (numpy) and moved to the run's device (`run_device`)."""
    from eval.mqar.model import MQARModel, parse_pattern

    device = run_device(cfg)

    vocab = by_length(cfg, "vocab_size", seq_len)
    data = MQARConfig(vocab, seq_len, kv, cfg["power_a"])
    bs = by_length(cfg, "batch_size", seq_len)
    test_x, test_y = (torch.from_numpy(a).to(device)
                      for a in generate(data, cfg["test_examples"], [cfg["test_seed"], seq_len]))
    fixed = cfg.get("train_examples") or 0
    if fixed:
        train_x, train_y = generate(data, fixed, [cfg["train_seed"], seq_len])
        steps_per_epoch = math.ceil(fixed / bs)
        total = steps_per_epoch * cfg["epochs"]
    else:
        total = by_length(cfg, "steps", seq_len)
    torch.manual_seed(cfg["train_seed"])
    model = MQARModel(parse_pattern(pattern, cfg["num_layers"]), vocab, d, seq_len, cfg.get("mixer_args") or {},
                      position_embeddings=pattern in cfg.get("position_embeddings", ())).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    eval_every = cfg.get("eval_every") or (steps_per_epoch if fixed else max(1, total // 8))
    target = cfg.get("target_accuracy")
    history, t0, loss_value = [], time.perf_counter(), float("nan")
    order = np.random.default_rng(cfg["train_seed"])
    for step in range(total):
        if fixed:
            if step % steps_per_epoch == 0:
                perm = order.permutation(fixed)
            idx = perm[(step % steps_per_epoch) * bs:(step % steps_per_epoch + 1) * bs]
            x, y = torch.from_numpy(train_x[idx]), torch.from_numpy(train_y[idx])
        else:
            x, y = (torch.from_numpy(a) for a in generate(data, bs, [cfg["train_seed"], seq_len, step]))
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        model.train()
        logits, targets = model(x, y)
        loss = torch.nn.functional.cross_entropy(logits, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            history.append((step + 1, 0.0))
            break
        if (step + 1) % eval_every == 0 or step + 1 == total:
            acc = accuracy(model, test_x, test_y)
            history.append((step + 1, acc))
            if log:
                log(f"  {pattern} L{seq_len} d{d} lr {lr:.2e} step {step + 1}/{total} loss {loss_value:.3f} acc {acc:.3f}",
                    flush=True)
            if target is not None and acc >= target:
                break
    return {"lr": lr, "accuracy": history[-1][1] if history else 0.0, "history": history, "steps": history[-1][0] if history else 0,
            "train_loss": loss_value, "seconds": round(time.perf_counter() - t0, 1), "device": str(device)}


@torch.no_grad()
def accuracy(model, x, y, batch: int = 256) -> float:
    model.eval()
    correct = total = 0
    for s in range(0, len(x), batch):
        logits, targets = model(x[s:s + batch], y[s:s + batch])
        correct += int((logits.argmax(-1) == targets).sum())
        total += len(targets)
    return correct / max(total, 1)


def learning_rates(cfg: dict, pattern: str) -> list[float]:
    """`lrs` is a list, or a mapping {"default": [...], pattern: [...]} for per-mixer lists."""
    lrs = cfg["lrs"]
    return list(lrs.get(pattern, lrs["default"]) if isinstance(lrs, dict) else lrs)


def run_cell(cfg: dict, pattern: str, seq_len: int, kv: int, d: int, log=None) -> dict:
    runs = []
    target = cfg.get("target_accuracy")
    for lr in learning_rates(cfg, pattern):
        runs.append(train_one(cfg, pattern, seq_len, kv, d, float(lr), log))
        if target is not None and runs[-1]["accuracy"] >= target:
            break  # this cell is solved; the remaining learning rates cannot change the verdict
    best = max(runs, key=lambda r: r["accuracy"])
    return {"pattern": pattern, "seq_len": seq_len, "kv_pairs": kv, "d_model": d,
            "settings": cell_settings(cfg, pattern, seq_len), "runs": runs,
            "best_accuracy": best["accuracy"], "best_lr": best["lr"], "seconds": sum(r["seconds"] for r in runs)}


def _work(item):
    cfg, pattern, seq_len, kv, d, threads, verbose = item
    torch.set_num_threads(threads)
    try:
        return cell_key(pattern, seq_len, kv, d), run_cell(cfg, pattern, seq_len, kv, d, print if verbose else None), None
    except Exception:  # noqa: BLE001 - reported per cell, the sweep goes on
        return cell_key(pattern, seq_len, kv, d), None, traceback.format_exc()


def cells(cfg: dict) -> list[tuple[str, int, int, int]]:
    """All cells in run order: `cell_order: cost` (default) runs the cheapest first (L x d); `width`
    runs the mixers not named in `priority` at the smallest width first, then each `priority` mixer
    length by length over all widths (in that order), then the rest."""
    out = []
    for seq_len, kv in cfg["lengths"]:
        for d in cfg["d_models"]:
            for pattern in cfg["mixers"]:
                out.append((pattern, int(seq_len), int(kv), int(d)))
    if cfg.get("cell_order", "cost") == "width":
        # the other mixers at the smallest width first, then each `priority` mixer over all widths,
        # then the rest
        smallest, prio = min(cfg["d_models"]), cfg.get("priority", [])
        rank = {p: i for i, p in enumerate(prio)}

        def group(c):
            return 1 if c[0] in rank else (0 if c[3] == smallest else 2)

        def order(c):  # priority mixers length by length (widths within), the others width by width
            inner = (c[1], c[3]) if c[0] in rank else (c[3], c[1])
            return (group(c), rank.get(c[0], 0), *inner, cfg["mixers"].index(c[0]))

        return sorted(out, key=order)
    return sorted(out, key=lambda c: (c[1] * c[3], cfg["mixers"].index(c[0])))


def load_results(out: Path, cfg: dict) -> dict:
    if not out.exists():
        return {"config": cfg, "cells": {}, "errors": {}, "skipped": [], "solved_below": {}}
    data = json.loads(out.read_text())
    old_cfg = data.get("config", {})
    for cell in data.get("cells", {}).values():  # results written before cells recorded their settings
        cell.setdefault("settings", cell_settings(old_cfg, cell["pattern"], cell["seq_len"]))
    data["config"] = cfg
    data.setdefault("cells", {})
    data.setdefault("errors", {})
    data["skipped"] = []
    data["solved_below"] = {}
    for pattern, seq_len, kv, d in cells(cfg):  # cells a run would skip, given what is cached
        key = cell_key(pattern, seq_len, kv, d)
        at = solved_at(data, pattern, seq_len, kv, d)
        if at is not None and key not in data["cells"]:
            data["solved_below"][key] = at
    return data


def save_results(out: Path, data: dict) -> None:
    atomic_write_json(out, data)


def solved_at(data: dict, pattern: str, seq_len: int, kv: int, d: int) -> int | None:
    """With `skip_solved_widths`, the smallest width below `d` at which this mixer already reached
    `target_accuracy` for this length (the cell at `d` then cannot change the mixer's verdict: the
    width it needs), else None."""
    cfg = data["config"]
    target = cfg.get("target_accuracy")
    if target is None or not cfg.get("skip_solved_widths"):
        return None
    for smaller in sorted(int(x) for x in cfg["d_models"] if int(x) < d):
        cell = data["cells"].get(cell_key(pattern, seq_len, kv, smaller))
        if cell is not None and is_current(data, cell) and cell["best_accuracy"] >= target:
            return smaller
    return None


def sweep(cfg: dict, out: str | Path, workers: int = 1, threads: int = 1, plot: str | Path | None = None,
          verbose: bool = True, retry_errors: bool = True) -> dict:
    """Run every cell not cached in `out`; returns the results dict (also written to `out`)."""
    out = Path(out)
    data = load_results(out, cfg)
    todo = []
    for pattern, seq_len, kv, d in cells(cfg):
        key = cell_key(pattern, seq_len, kv, d)
        cached = data["cells"].get(key)
        if cached is not None and is_current(data, cached):
            continue  # finished with these settings
        if key in data["errors"] and not retry_errors:
            continue
        if not registered(pattern):
            data["skipped"].append(key)
            continue
        data["errors"].pop(key, None)
        todo.append((cfg, pattern, seq_len, kv, d, threads, verbose))
    if data["skipped"] and verbose:
        print(f"skipping {len(data['skipped'])} cells whose layer types are not registered: "
              f"{sorted({k.split('|')[0] for k in data['skipped']})}", flush=True)
    t0 = time.perf_counter()

    def record(result):
        key, cell, err = result
        if cell is not None:
            data["cells"][key] = cell
            if verbose:
                print(f"{key}: best accuracy {cell['best_accuracy']:.3f} (lr {cell['best_lr']:.1e}) "
                      f"in {cell['seconds']:.0f} s [{time.perf_counter() - t0:.0f} s]", flush=True)
        else:
            data["errors"][key] = err
            print(f"{key}: failed\n{err}", flush=True)
        data["table"] = table(data)
        data["remaining"] = remaining(data)
        save_results(out, data)

    import queue

    done: queue.Queue = queue.Queue()
    pool = None
    if workers > 1 and len(todo) > 1:
        import multiprocessing as mp

        pool = mp.get_context("fork").Pool(workers, maxtasksperchild=1)
    waiting, running = list(todo), set()
    try:
        while waiting or running:
            for item in list(waiting):  # start what can start, in run order
                if len(running) >= max(workers, 1):
                    break
                _, pattern, seq_len, kv, d = item[:5]
                key = cell_key(pattern, seq_len, kv, d)
                if cfg.get("skip_solved_widths"):
                    smaller = {cell_key(pattern, seq_len, kv, x) for x in cfg["d_models"] if x < d}
                    if smaller & (running | {cell_key(*w[1:5]) for w in waiting}):
                        continue  # decided once the smaller widths of this mixer and length are in
                    at = solved_at(data, pattern, seq_len, kv, d)
                    if at is not None:
                        waiting.remove(item)
                        data["solved_below"][key] = at
                        if verbose:
                            print(f"{key}: not run, reached the target at d={at}", flush=True)
                        continue
                waiting.remove(item)
                running.add(key)
                if pool is None:
                    done.put(_work(item))
                else:
                    pool.apply_async(_work, (item,), callback=done.put)
            if running:
                result = done.get()
                running.discard(result[0])
                record(result)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    data["table"] = table(data)
    data["remaining"] = remaining(data)
    save_results(out, data)
    if plot:
        plot_sweep(data, plot)
    return data


def remaining(data: dict) -> list[str]:
    """Cells of the config neither computed with current settings, nor skipped as solved at a smaller
    width, nor of an unregistered layer type: what rerunning the command would train."""
    out = []
    for c in cells(data["config"]):
        key = cell_key(*c)
        cell = data["cells"].get(key)
        if (cell is None or not is_current(data, cell)) and key not in data.get("solved_below", {}) \
                and key not in data.get("skipped", []):
            out.append(key)
    return out


def is_current(data: dict, cell: dict) -> bool:
    """The cell was computed with the settings the sweep's config gives it now."""
    want = json.loads(json.dumps(cell_settings(data["config"], cell["pattern"], cell["seq_len"])))
    return cell.get("settings") == want


def table(data: dict) -> dict:
    """{pattern: {"L64/kv4": {d: best accuracy}}} over the cached cells computed with current settings."""
    out: dict = {}
    for cell in data["cells"].values():
        if not is_current(data, cell):
            continue
        row = out.setdefault(cell["pattern"], {}).setdefault(f"L{cell['seq_len']}/kv{cell['kv_pairs']}", {})
        row[str(cell["d_model"])] = cell["best_accuracy"]
    return out


def markdown_table(data: dict) -> str:
    """Best test accuracy (%) per mixer and length (rows) and width (columns); '—' = not run, '✓' = not
    run because the mixer reached the target accuracy at a smaller width for that length."""
    cfg = data["config"]
    ds = [str(d) for d in cfg["d_models"]]
    lines = ["| mixer | L / KV pairs | " + " | ".join(f"d={d}" for d in ds) + " |", "|---|---|" + "---|" * len(ds)]
    tab = table(data)
    for pattern in cfg["mixers"]:
        for L, kv in cfg["lengths"]:
            row = tab.get(pattern, {}).get(f"L{L}/kv{kv}", {})
            solved = data.get("solved_below", {})
            vals = [row.get(d) for d in ds]
            marks = ["✓" if cell_key(pattern, L, kv, int(d)) in solved else "—" for d in ds]
            lines.append(f"| {pattern} | {L} / {kv} | "
                         + " | ".join(m if v is None else f"{100 * v:.1f}" for v, m in zip(vals, marks)) + " |")
    return "\n".join(lines)


def plot_sweep(data: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = data["config"]
    lengths = cfg["lengths"]
    fig, axes = plt.subplots(1, len(lengths), figsize=(4 * len(lengths), 3.9), sharey=True, squeeze=False)
    tab = table(data)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^vP*X"
    ds_all = cfg["d_models"]
    for ax, (L, kv) in zip(axes[0], lengths):
        for i, pattern in enumerate(cfg["mixers"]):  # one colour and marker per mixer in every panel
            row = tab.get(pattern, {}).get(f"L{L}/kv{kv}", {})
            ds = [d for d in ds_all if str(d) in row]
            if ds:
                ax.plot(ds, [row[str(d)] for d in ds], marker=markers[i % len(markers)], color=colors[i % len(colors)],
                        alpha=0.8, ms=7 - i, label=pattern)
            solved = [d for d in ds_all if cell_key(pattern, L, kv, d) in data.get("solved_below", {})]
            if solved:  # not run: solved at a smaller width; hollow markers at the target, no line
                ax.plot(solved, [cfg["target_accuracy"]] * len(solved), linestyle="none", marker=markers[i % len(markers)],
                        mfc="none", color=colors[i % len(colors)], alpha=0.8, ms=7 - i)
        ax.set_xscale("log", base=2)
        ax.set_xlim(min(ds_all) / 1.3, max(ds_all) * 1.3)
        ax.set_xticks(ds_all, [str(d) for d in ds_all])
        ax.set_title(f"sequence length {L}, {kv} KV pairs")
        ax.set_xlabel("model dimension")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("MQAR test accuracy")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    # legend and note in a band below the panels, where they cannot cover a data point
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    if handles:
        fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=len(handles), frameon=False,
                   bbox_to_anchor=(0.5, 0.03))
    if data.get("solved_below"):
        fig.text(0.01, 0.005, "hollow: not run, the mixer reached the target at a smaller width", fontsize=7)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""`python -m eval.mqar generate ...`, `... sweep ...` (see eval/mqar/configs.py) and `... plot ...` (state_plot.py)."""
from __future__ import annotations

import argparse
import json
import sys


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.mqar", description="MQAR synthetic data and sweeps (Zoology §3.2)")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write MQAR examples (inputs, labels) to an .npz")
    g.add_argument("--vocab-size", type=int, default=8192)
    g.add_argument("--seq-len", type=int, default=64)
    g.add_argument("--kv-pairs", type=int, default=4)
    g.add_argument("--num-examples", type=int, required=True)
    g.add_argument("--seed", type=int, required=True, help="use different seeds for train and test sets")
    g.add_argument("--power-a", type=float, default=0.01)
    g.add_argument("--filler", choices=("zero", "random"), default="zero")
    g.add_argument("--out", required=True)

    q = sub.add_parser("plot", help="MQAR accuracy vs inference state bytes, one point per (mixer, width): PNG + JSON")
    q.add_argument("--results", nargs="+", required=True, help="sweep result JSONs")
    q.add_argument("--seq-len", type=int, default=64, help="the length whose cells are plotted (default 64)")
    q.add_argument("--out", required=True, help="PNG; the points go to the same name with .json")

    s = sub.add_parser("sweep", help="train 2-layer models per (mixer, length, width, lr); best accuracy per cell")
    s.add_argument("--config", default="cpu", help="named settings: paper | cpu | smoke (flags below override)")
    s.add_argument("--mixers", default=None, help="comma-separated layer-type patterns, e.g. attention,baseconv,"
                   "baseconv+sparse_programmatic ('+' gives one type per layer)")
    s.add_argument("--d-model", default=None, help="comma-separated widths")
    s.add_argument("--seq-len", default=None, help="comma-separated lengths")
    s.add_argument("--kv-pairs", default=None, help="comma-separated pairs per length (default L/16)")
    s.add_argument("--lrs", default=None, help="comma-separated learning rates")
    s.add_argument("--vocab-size", type=int, default=None)
    s.add_argument("--steps", type=int, default=None, help="steps per run with fresh examples")
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--mixer-args", default=None, help="JSON {layer type: {key: value}} over the registry's "
                   "defaults, e.g. '{\"gla\": {\"conv_size\": 4}}' (recorded per cell)")
    s.add_argument("--out", required=True, help="results JSON (finished cells are cached there: rerun to resume)")
    s.add_argument("--plot", default=None, help="PNG (default: beside --out)")
    s.add_argument("--workers", type=int, default=1, help="processes, one cell each")
    s.add_argument("--threads", type=int, default=1, help="torch threads per process")
    s.add_argument("--device", default="cpu", help="cpu | cuda[:N] | auto (CUDA when available; default cpu)")
    s.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def sweep_config(ns) -> dict:
    from eval.mqar import configs

    cfg = configs.get(ns.config)
    if ns.mixers:
        cfg["mixers"] = [m for m in ns.mixers.split(",") if m]
    if ns.d_model:
        cfg["d_models"] = _ints(ns.d_model)
    if ns.seq_len:
        lens = _ints(ns.seq_len)
        kvs = _ints(ns.kv_pairs) if ns.kv_pairs else [max(1, L // 16) for L in lens]
        if len(kvs) != len(lens):
            raise ValueError(f"--kv-pairs has {len(kvs)} entries for {len(lens)} lengths; give one per length")
        cfg["lengths"] = [[L, kv] for L, kv in zip(lens, kvs)]
    if ns.lrs:
        cfg["lrs"] = _floats(ns.lrs)
    if ns.vocab_size:
        cfg["vocab_size"] = ns.vocab_size
    if ns.steps:
        cfg["steps"] = ns.steps
        cfg["train_examples"] = 0
    if ns.batch_size:
        cfg["batch_size"] = ns.batch_size
    if ns.mixer_args:
        try:
            extra = json.loads(ns.mixer_args)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--mixer-args: {ns.mixer_args!r} is not JSON ({exc.msg}); write e.g. "
                             '\'{"gla": {"conv_size": 4}}\'') from None
        if not isinstance(extra, dict) or not all(isinstance(v, dict) for v in extra.values()):
            raise ValueError(f"--mixer-args: {ns.mixer_args!r}; give a mapping of layer type to a mapping of keys")
        from neox_zoology import registry

        for name, args in extra.items():
            try:
                registry.resolve_args(name, args)
            except KeyError as exc:
                raise ValueError(f"--mixer-args: {exc.args[0]}") from None
            cfg["mixer_args"].setdefault(name, {}).update(args)
    cfg["device"] = ns.device
    return cfg


def main(argv=None) -> int:
    ns = parse(argv)
    from eval.mqar.data import MQARConfig, MQARError, generate, save_npz

    if ns.cmd == "generate":
        cfg = MQARConfig(ns.vocab_size, ns.seq_len, ns.kv_pairs, ns.power_a, ns.filler)
        try:
            inputs, labels = generate(cfg, ns.num_examples, ns.seed)
        except MQARError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        save_npz(ns.out, inputs, labels, cfg, ns.seed)
        print(json.dumps({"out": ns.out, "inputs": list(inputs.shape), "queries": int((labels >= 0).sum())}))
        return 0
    from pathlib import Path

    if ns.cmd == "plot":
        from eval.mqar.state_plot import plot

        missing = [r for r in ns.results if not Path(r).exists()]
        if missing:
            print(f"error: --results: {', '.join(missing)} not found; give sweep result JSONs", file=sys.stderr)
            return 2
        try:
            res = plot(ns.results, ns.out, str(Path(ns.out).with_suffix(".json")), ns.seq_len)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for p in res["points"]:
            print(f"{p['mixer']:<40} d={p['d_model']:<4} state {p['state_bytes']:>10,} B  accuracy {100 * p['accuracy']:.1f}%")
        return 0
    from eval.mqar.sweep import markdown_table, sweep

    try:
        cfg = sweep_config(ns)
        for L, kv in cfg["lengths"]:
            from eval.mqar.sweep import by_length

            MQARConfig(by_length(cfg, "vocab_size", L), L, kv, cfg["power_a"]).check()
    except (MQARError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    plot = ns.plot or str(Path(ns.out).with_suffix(".png"))
    try:
        data = sweep(cfg, ns.out, workers=ns.workers, threads=ns.threads, plot=plot, verbose=not ns.quiet)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown_table(data))
    return 1 if data["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

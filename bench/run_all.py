"""`make bench`: every CPU benchmark in turn, each timed, then the summary table.

    python -m bench.run_all [--only NAME,...] [--results bench/results]

Each benchmark runs as its own process (a failure is recorded and the others still run); the list
with wall times and exit statuses goes to `<results>/run_all.json`, and `bench.summary` writes
`<results>/SUMMARY.md` from all result JSONs. Exit status 1 when any benchmark failed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

from bench import summary

ROOT = Path(__file__).resolve().parents[1]

# (name, arguments after `python -m`); paths relative to the results directory are filled in below.
BENCHMARKS = [
    ("trainer_overhead", ["bench.trainer_overhead", "--out", "{r}/trainer_overhead.json"]),
    ("train_throughput", ["bench.train_throughput", "{throughput_args}", "--out", "{r}/train_throughput_quick.json",
                          "--md", "{r}/train_throughput_quick.md"]),
    ("mixers", ["bench.mixers", "--seq-len", "2048", "--out", "{r}/mixers_2048.json", "--md", "{r}/mixers_2048.md"]),
    ("sparse", ["bench.sparse", "--seq-len", "2048", "8192", "--out", "{r}/sparse.json", "--md", "{r}/sparse.md"]),
    ("ar_eval", ["bench.ar_eval", "--out", "{r}/ar_eval.json"]),
    ("preprocess", ["bench.preprocess", "--mb", "24", "--rounds", "2", "--out", "{r}/preprocess.json",
                    "--md", "{r}/preprocess.md"]),
    ("decode", ["bench.decode", "--out", "{r}/decode.json", "--md", "{r}/decode.md", "--png", "{r}/decode.png"]),
    ("prefill", ["bench.prefill", "--out", "{r}/prefill.json", "--md", "{r}/prefill.md"]),
    ("bigrams", ["bench.bigrams", "--out", "{r}/bigrams.json", "--md", "{r}/bigrams.md"]),
    ("recall", ["bench.recall", "--out", "{r}/recall.json", "--md", "{r}/recall.md"]),
]

# The end-to-end set that fits the make-bench budget (~4 minutes on 2 cores): attention, BaseConv and the
# three sparse hybrids at L=2048, cut to 6 layers (the hybrids' first sparse layer is layer 5), one timed
# step. The parameter-matched full-depth comparison: `python -m bench.train_throughput` (README).
THROUGHPUT_ARGS: list[str] = [
    "--config", "configs/neox/attention_160m.yml", "--config", "configs/neox/baseconv_160m.yml",
    "--config", "configs/neox/baseconv_random_160m.yml", "--config", "configs/neox/baseconv_programmatic_160m.yml",
    "--config", "configs/neox/baseconv_learned_160m.yml", "--seq-len", "2048", "--num-layers", "6", "--steps", "1",
]


def commands(results: Path) -> list[tuple[str, list[str]]]:
    out = []
    for name, args in BENCHMARKS:
        cmd = [sys.executable, "-m"]
        for a in args:
            if a == "{throughput_args}":
                cmd += THROUGHPUT_ARGS
            else:
                cmd.append(a.replace("{r}", str(results)))
        out.append((name, cmd))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__.splitlines()[0])
    p.add_argument("--only", default=None, help="comma-separated benchmark names (default: all)")
    p.add_argument("--results", default=str(ROOT / "bench" / "results"))
    ns = p.parse_args(argv)
    results = Path(ns.results)
    results.mkdir(parents=True, exist_ok=True)
    only = set(ns.only.split(",")) if ns.only else None
    unknown = (only or set()) - {n for n, _ in BENCHMARKS}
    if unknown:
        p.error(f"--only: unknown benchmark(s) {sorted(unknown)}; choose from {[n for n, _ in BENCHMARKS]}")
    steps, t_all = [], time.perf_counter()
    for name, cmd in commands(results):
        if only and name not in only:
            continue
        print(f"== {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL).returncode
        steps.append({"name": name, "command": cmd[1:], "seconds": round(time.perf_counter() - t0, 1),
                      "returncode": rc})
        print(f"== {name}: exit {rc} after {steps[-1]['seconds']:.0f} s", file=sys.stderr, flush=True)
    log = {"benchmark": "run_all", "steps": steps, "total_s": round(time.perf_counter() - t_all, 1),
           "finished": datetime.datetime.now().isoformat(timespec="seconds")}
    (results / "run_all.json").write_text(json.dumps(log, indent=1))
    summary.main(["--results", str(results)])
    return 1 if any(s["returncode"] for s in steps) else 0


if __name__ == "__main__":
    sys.exit(main())

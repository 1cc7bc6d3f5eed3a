"""One Markdown table of every benchmark's headline figures, read from `bench/results/*.json` and
`bench/results/gpu/*.json` (what `make gpu-check` measured on a GPU).

    python -m bench.summary [--results bench/results] [--out bench/results/SUMMARY.md]

Each row is a ratio against the peer that benchmark measured in the same run (or an absolute figure
with its target), the target, and whether it was met. Benchmarks whose JSON is missing are listed as
not run. The machine line and load averages come from the JSONs themselves: compare rows of one run,
not across machines.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, (list, tuple)):
        return " → ".join(_fmt(x) for x in v)
    return str(v)


def _target_list(d: dict, label) -> list[tuple]:
    """The common shape: `targets` = [{target, value, met, ...}, ...]."""
    return [(label(t), t["value"], t["target"], t["met"] if "met" in t else t["meets"])
            for t in d.get("targets", []) if isinstance(t, dict) and "value" in t]


def _train_throughput(d):
    layers = f", every config cut to {d['num_layers_override']} layers" if d.get("num_layers_override") else ""
    return [(t["target"] + layers, t["value"], f">= {_fmt(t['threshold'])}" if "threshold" in t else None,
             t["meets"] if "meets" in t else t.get("met")) for t in d.get("targets", []) if "value" in t]


def _mixers(d):
    rows = _target_list(d, lambda t: f"{t['mixer']} L={t['seq_len']} {t['kind']} vs attention")
    for f in d.get("fft_check", []):
        rows.append((f"FFT conv vs plain torch.fft, L={f['seq_len']}", f["ratio"], f"<= {f['target_ratio']}",
                     f["target_met"]))
    return rows


def _sparse(d):
    return _target_list(d, lambda t: f"{t['row']} L={t['seq_len']} {t['kind']} vs attention")


def _recall(d):
    return [(f"{t['mixer']} L={t['seq_len']} fwd+bwd time vs attention", t["ratio_time"], f"<= {t['target']}",
             t["met"]) for t in d.get("targets", [])]


def _trainer_overhead(d):
    return [("trainer step / bare PyTorch step", d["ratio"], f"<= {d['target_ratio']}", d["target_met"])]


def _ar_eval(d):
    return [("AR-slice hook / plain validation pass", d["ratio"], f"<= {d['target_ratio']}", d["target_met"])]


def _preprocess(d):
    r, t, met = d["ratios"], d["targets"], d["target_met"]
    return [("preprocess 2 workers / 1 worker", r["ours_2_vs_ours_1"], f">= {t['ours_2_vs_ours_1']}",
             met["ours_2_vs_ours_1"]),
            ("preprocess ours / plain loop", max(r["ours_1_vs_peer"], r["ours_2_vs_peer"]), f">= {t['ours_vs_peer']}",
             met["ours_vs_peer"])]


def _bigrams(d):
    s, t, met = d["summary"], d["targets"], d["target_met"]
    return [("bigram counting tokens/s", s["ours_tokens_per_s"], f">= {t['tokens_per_s']:.3g}", met["tokens_per_s"]),
            ("bigram counting / Counter peer", s["ratio_vs_peer"], None, None),
            ("bigram counting peak RSS (bytes)", s["ours_peak_rss_bytes_all"], f"<= {t['peak_rss_bytes']:.3g}",
             met["peak_rss_bytes"])]


def _activation_checkpointing(d):
    rows = []
    tgt = d.get("targets", {})
    for r in d["results"]:
        if "time_ratio" not in r:
            continue
        name = Path(r["config"]).stem
        extra = f", head chunks {r['lm_head_chunk_tokens']}" if r.get("lm_head_chunk_tokens") else ""
        rows.append((f"checkpointed / plain step time, {name}{extra}", r["time_ratio"], tgt.get("time_ratio"),
                     r.get("time_met", _cmp(r["time_ratio"], tgt.get("time_ratio")))))
        rows.append((f"checkpointed / plain activation memory, {name}{extra}", r["memory_ratio"],
                     tgt.get("memory_ratio"), r.get("memory_met", _cmp(r["memory_ratio"], tgt.get("memory_ratio")))))
    return rows


def _memory_plan(d):
    return [(f"measured / --dry-run estimated peak memory, {r['case']}", r["ratio"], "within 25%", r["within_25pct"])
            for r in d["results"]]


def _compile(d):
    return [(f"torch.compile / eager fwd+bwd, {r['mixer']}", r["ratio"], None, None) for r in d["results"]
            if r.get("ratio") is not None]


def _checkpoint(d):
    rows = [("checkpoint save / plain torch.save", d["save_ratio"], None, None),
            ("checkpoint load / plain torch.load", d["load_ratio"], None, None)]
    if "manifest_cost" in d:
        rows.append(("checkpoint manifest: save time with / without - 1", d["manifest_cost"], "<= 0.1",
                     d["manifest_cost"] <= 0.1))
    return rows


def _reference(d):
    if d.get("skipped"):
        return [(f"skipped: {d['skipped']}", None, None, None)]
    rows = []
    for t in d.get("targets", []):
        th = t["threshold"]
        target = f"within [{th[0]:.3g}, {th[1]:.3g}]" if isinstance(th, list) else f"<= {_fmt(th)}"
        rows.append((t["target"] + (f" ({t['note']})" if t.get("note") else ""), t["value"], target, t["met"]))
    return rows


def _cmp(value, target: str | None):
    """`target` like '<= 0.5' or '>= 1.3'."""
    if value is None or not target:
        return None
    op, _, num = str(target).partition(" ")
    try:
        bound = float(num)
    except ValueError:
        return None
    return value <= bound if op == "<=" else value >= bound if op == ">=" else None


def _decode(d):
    rows = []
    top = max(r["context"] for r in d["results"])
    for r in d["results"]:
        if r["context"] == top and r["row"] != d["peer"]:
            rows.append((f"{r['row']} decode tokens/s vs {d['peer']}, context {top:,}", r["ratio_tokens_per_s"], None, None))
            rows.append((f"{r['row']} decoding state bytes vs {d['peer']}, context {top:,}", r["ratio_state"], None, None))
    return rows


def _prefill(d):
    return [(f"{r['row']} prefill of {r['prompt']:,} tokens: stepped time / one-pass time", r["speedup"], None, None)
            for r in d["results"]]


EXTRACTORS = {
    "trainer_overhead": _trainer_overhead,
    "train_throughput": _train_throughput,
    "mixers": _mixers,
    "reference": _reference,
    "sparse": _sparse,
    "activation_checkpointing": _activation_checkpointing,
    "memory_plan": _memory_plan,
    "compile": _compile,
    "ar_eval": _ar_eval,
    "checkpoint": _checkpoint,
    "preprocess": _preprocess,
    "bigrams": _bigrams,
    "recall": _recall,
    "decode": _decode,
    "prefill": _prefill,
}


def collect(results: Path) -> list[dict]:
    """One entry per results JSON (sorted by the EXTRACTORS order), with its rows."""
    out = []
    files = sorted(results.glob("*.json")) + sorted(results.glob("gpu/*.json"))  # gpu/: make gpu-check
    for path in files:
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            out.append({"file": path.name, "benchmark": "?", "error": f"unreadable: {e}", "rows": []})
            continue
        if not isinstance(d, dict) or d.get("benchmark") not in EXTRACTORS:
            continue  # not a benchmark result (e.g. the run log)
        try:
            rows = EXTRACTORS[d["benchmark"]](d)
            err = None
        except (KeyError, TypeError, ValueError) as e:
            rows, err = [], f"unexpected JSON layout: {type(e).__name__}: {e}"
        m = d.get("machine") or {}
        out.append({"file": str(path.relative_to(results)), "benchmark": d["benchmark"], "rows": rows, "error": err,
                    "machine": f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, torch {m.get('torch', '?')}"
                               + (f", {m['gpu']}" if m.get("gpu") else ""),
                    "load": (m.get("loadavg_1min_at_start", d.get("loadavg_1min_at_start")),
                             m.get("loadavg_1min_at_end")),
                    "wall_s": d.get("wall_s")})
    order = list(EXTRACTORS)
    return sorted(out, key=lambda e: (order.index(e["benchmark"]) if e["benchmark"] in order else 99, e["file"]))


def markdown(entries: list[dict], run_log: dict | None = None) -> str:
    lines = ["# Benchmark summary", "",
             "Every ratio is against a peer measured in the same run of the same benchmark. "
             "Per-benchmark details: the `.md`/`.json` files beside this one.", ""]
    if run_log:
        total = run_log.get("total_s")
        parts = ", ".join(f"{st['name']} {st['seconds']:.0f} s" for st in run_log.get("steps", []))
        lines.append(f"Last `make bench`: {run_log.get('finished', '?')}, {total / 60:.1f} min in total ({parts}).")
        failed = [s["name"] for s in run_log.get("steps", []) if s.get("returncode")]
        if failed:
            lines.append(f"Failed in that run: {', '.join(failed)} (their rows below are from an earlier run).")
        lines.append("")
    lines += ["| benchmark | measure | value | target | met |", "|---|---|---:|---|---|"]
    for e in entries:
        if e.get("error"):
            lines.append(f"| {e['benchmark']} ({e['file']}) | {e['error']} | | | |")
        for name, value, target, met in e["rows"]:
            lines.append(f"| {Path(e['file']).stem} | {name} | {_fmt(value)} | {_fmt(target)} | {_fmt(met)} |")
    lines += ["", "| file | machine | load (1-min, start / end) | wall s |", "|---|---|---|---:|"]
    for e in entries:
        if "machine" in e:
            lines.append(f"| {e['file']} | {e['machine']} | {_fmt(e['load'][0])} / {_fmt(e['load'][1])} | "
                         f"{_fmt(e['wall_s'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    p = argparse.ArgumentParser(prog="python -m bench.summary", description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--out", default=None, help="default: <results>/SUMMARY.md")
    ns = p.parse_args(argv)
    results = Path(ns.results)
    log_path = results / "run_all.json"
    run_log = json.loads(log_path.read_text()) if log_path.exists() else None
    text = markdown(collect(results), run_log)
    out = Path(ns.out) if ns.out else results / "SUMMARY.md"
    out.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()

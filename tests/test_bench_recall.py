"""bench.recall at a tiny size: every section is filled, ratios are against attention of the same run."""
from __future__ import annotations

import json

import pytest

from bench import recall, run_all
from neox_zoology import registry

TINY = ["--hidden", "32", "--heads", "4", "--seq-len", "32", "--seq-len", "64", "--context", "48",
        "--decode-steps", "2", "--threads", "1", "--mixers", "gla,mamba"]


def test_tiny_run_fills_every_section(tmp_path):
    out, md = tmp_path / "recall.json", tmp_path / "recall.md"
    res = recall.main(TINY + ["--out", str(out), "--md", str(md)])
    assert json.loads(out.read_text())["benchmark"] == "recall" and "| gla |" in md.read_text()

    rows = {(r["mixer"], r["seq_len"]): r for r in res["training"]}
    assert set(rows) == {(m, L) for m in ("attention", "gla", "mamba") for L in (32, 64)}
    for (m, L), r in rows.items():
        assert r["time_s"] > 0 and r["peak_mem_bytes"] >= 0
        if m != "attention":
            assert r["ratio_time"] == pytest.approx(r["time_s"] / rows["attention", L]["time_s"])
    assert res["targets"] == []  # 8192 is not measured

    states = {(r["layer_type"], r["layer_index"]): r for r in res["state_bytes"]}
    assert {t for t, _ in states} == set(registry.names())
    assert states["attention", 0]["grows_with_L"] and not states["gla", 0]["grows_with_L"]
    assert states["attention", 0]["state_bytes"]["48"] == 2 * 48 * 32 * registry.STATE_BYTES

    dec = {r["layer_type"]: r for r in res["decode"]}
    assert list(dec) == ["attention", "gla", "mamba"]
    for m in ("gla", "mamba"):
        assert dec[m]["speedup_vs_attention"] == pytest.approx(dec[m]["tokens_per_s"] / dec["attention"]["tokens_per_s"])
        assert dec[m]["state_bytes"] > 0


def test_a_failed_measurement_is_skipped_with_its_reason(monkeypatch):
    monkeypatch.setattr(recall, "run_sub", lambda name, **kw: {"mixer": name, "batch": 1, "seq_len": kw["L"],
                                                                   "error": "exit -9: killed"} if name == "attention"
                        else {"mixer": name, "batch": 1, "seq_len": kw["L"], "time_s": 1.0, "peak_mem_bytes": 1})
    ns = recall.parse(TINY)
    rows = recall.training(ns, ["gla"], 1)
    assert rows[0]["skipped"] == "exit -9: killed" and "time_s" not in rows[0]
    assert "ratio_time" not in rows[1]  # no peer, no ratio
    assert "skipped: exit -9" in recall.markdown({"hidden": 32, "training": rows, "state_bytes": [], "decode": [],
                                                  "context": 48})


def test_run_all_lists_it():
    assert "recall" in dict(run_all.BENCHMARKS)


def test_summary_reads_its_targets():
    from bench import summary

    d = {"benchmark": "recall", "targets": [{"mixer": "gla", "seq_len": 8192, "ratio_time": 0.4, "target": 0.5,
                                             "met": True}]}
    assert summary.EXTRACTORS["recall"](d) == [("gla L=8192 fwd+bwd time vs attention", 0.4, "<= 0.5", True)]

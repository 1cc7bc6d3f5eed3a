"""bench.mixers: a tiny in-process run (no memory) and one fresh-subprocess memory measurement."""
from __future__ import annotations

import json

import pytest

from bench import mixers

TINY = ["--batch", "1", "--hidden", "32", "--heads", "4", "--seq-len", "64", "--repeats", "1", "--warmup", "1",
        "--threads", "1"]


def test_tiny_in_process_run_reports_ratios_and_targets(tmp_path, capfd):
    out, md = tmp_path / "sub" / "mixers.json", tmp_path / "mixers.md"
    result = mixers.main(TINY + ["--mixers", "attention,baseconv,hyena", "--no-mem", "--fft-extra-len", "0",
                                 "--out", str(out), "--md", str(md)])

    rows = {r["mixer"]: r for r in result["results"]}
    assert list(rows) == ["attention", "projection_dxd", "baseconv_short", "baseconv_long", "hyena"]
    # dense projections in units of d x d: attention qkv + out = 4, BaseConv's gate = 1, Hyena in (3) + out (1)
    assert [rows[m]["dense_projections"] for m in ("attention", "baseconv_short", "baseconv_long", "hyena")] == [4, 1, 1, 4]
    floor = rows["projection_dxd"]["time_s"] * 4 / rows["attention"]["time_s"]
    assert rows["hyena"]["floor_ratio"] == pytest.approx(floor)
    for r in rows.values():
        assert r["seq_len"] == 64 and r["batch"] == 1
        assert r["time_s"] > 0 and len(r["times_s"]) == 1
        assert r["ratio_time"] == pytest.approx(r["time_s"] / rows["attention"]["time_s"])
        assert "peak_mem_bytes" not in r  # --no-mem
    assert rows["attention"]["ratio_time"] == pytest.approx(1.0)
    assert rows["baseconv_short"]["build_kwargs"] == {"layer_index": 0}
    assert rows["baseconv_long"]["build_kwargs"] == {"layer_index": 1}
    assert rows["hyena"]["is_gated_conv"] and not rows["attention"]["is_gated_conv"]
    # L=64 is neither target length: no targets to decide
    assert result["targets"] == [] and result["targets_met"] == result["targets_missed"] == 0

    (fft,) = result["fft_check"]
    assert fft["seq_len"] == 64 and fft["fft_size_ours"] == fft["fft_size_naive"] == 128
    assert fft["ratio"] == pytest.approx(fft["ours_time_s"] / fft["naive_time_s"])
    assert fft["target_met"] == (fft["ratio"] <= 1.0)
    assert fft["max_abs_diff"] < 1e-4
    for key in ("cpu", "cores", "torch", "threads"):
        assert result["machine"][key]

    printed = json.loads(capfd.readouterr().out)
    assert printed == json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert "| baseconv_long | 64 |" in md.read_text()


def test_targets_are_judged_against_the_attention_peer():
    rows = {2048: {"attention": {"time_s": 2.0, "peak_mem_bytes": 100},
                   "hyena": {"time_s": 0.9, "ratio_time": 0.45}},
            16384: {"attention": {"time_s": 10.0},
                    "rwkv": {"time_s": 2.0, "ratio_time": 0.2, "ratio_mem": 0.5},
                    "h3": {"skipped": "too slow"}}}
    t = {(x["mixer"], x["seq_len"], x["kind"]): x for x in mixers._targets(rows, [2048, 16384])}
    assert t[("hyena", 2048, "time")]["met"] is True
    assert t[("rwkv", 16384, "time")]["met"] is False
    assert t[("rwkv", 16384, "memory")]["met"] is True
    assert t[("h3", 16384, "time")]["met"] is None and t[("h3", 16384, "time")]["note"] == "too slow"


def test_one_subprocess_memory_measurement():
    ns = mixers.parse(TINY)
    r = mixers.run_sub("attention", batch=1, L=64, ns=ns, threads=1)
    assert "error" not in r, r.get("error")
    assert r["time_s"] > 0 and r["peak_mem_bytes"] >= 0
    assert r["peak_rss_bytes"] >= r["rss_before_forward_bytes"]
    assert r["layer_type"] == "attention"


def test_bad_options_are_refused():
    with pytest.raises(SystemExit):
        mixers.parse(["--repeats", "0"])
    with pytest.raises(SystemExit):
        mixers.parse(["--batch-at", "16384"])


def test_merge_pairs_each_row_with_attention_at_the_same_length_and_batch(tmp_path):
    def run(batch, rows):
        return {"benchmark": "mixers", "batch": batch, "batch_at": {}, "hidden": 768, "attention_heads": 12,
                "dtype": "fp32", "seq_lens": [16384], "repeats": 2, "warmup": 1, "wall_s": 1.0,
                "machine": {"cpu": "x", "cores": 2, "torch": "t"}, "threads": 2, "fft_check": [],
                "results": [{"mixer": m, "seq_len": 16384, "batch": batch, "is_gated_conv": m != "attention", **v}
                            for m, v in rows.items()]}

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(run(1, {"attention": {"time_s": 10.0, "peak_mem_bytes": 100},
                                    "h3": {"time_s": 40.0, "peak_mem_bytes": 1000}})))
    b.write_text(json.dumps(run(4, {"attention": {"time_s": 50.0, "peak_mem_bytes": 400},
                                    "hyena": {"time_s": 4.0, "peak_mem_bytes": 200},
                                    "h3": {"skipped": "too big"}})))
    res = mixers.main(["--merge", str(a), str(b), "--md", str(tmp_path / "m.md")])
    rows = {(r["mixer"], r["batch"]): r for r in res["results"]}
    assert rows[("h3", 1)]["ratio_time"] == pytest.approx(4.0) and rows[("h3", 1)]["ratio_mem"] == pytest.approx(10.0)
    assert rows[("hyena", 4)]["ratio_time"] == pytest.approx(0.08) and rows[("hyena", 4)]["ratio_mem"] == 0.5
    t = {(x["mixer"], x["batch"], x["kind"]): x["met"] for x in res["targets"]}
    assert t == {("h3", 1, "time"): False, ("h3", 1, "memory"): False, ("hyena", 4, "time"): True,
                 ("hyena", 4, "memory"): True, ("h3", 4, "time"): None, ("h3", 4, "memory"): None}
    assert (res["targets_met"], res["targets_missed"], res["targets_undecided"]) == (2, 2, 2)
    assert "skipped: too big" in (tmp_path / "m.md").read_text()

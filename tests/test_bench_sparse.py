"""bench.sparse: a tiny in-process run (no memory), one fresh-subprocess memory measurement, the targets."""
from __future__ import annotations

import json

import pytest

from bench import sparse as bench

TINY = ["--batch", "1", "--hidden", "32", "--heads", "4", "--seq-len", "32", "64", "--repeats", "1",
        "--warmup", "1", "--threads", "1", "--rounds", "2"]


def test_tiny_in_process_run_reports_ratios_and_targets(tmp_path, capfd):
    out, md = tmp_path / "sub" / "sparse.json", tmp_path / "sparse.md"
    result = bench.main(TINY + ["--no-mem", "--out", str(out), "--md", str(md)])

    rows = {(r["row"], r["seq_len"]): r for r in result["results"]}
    assert sorted(rows) == sorted((r, L) for r in bench.ROWS for L in (32, 64))
    for (row, L), r in rows.items():
        att = rows[("attention", L)]
        assert r["time_s"] > 0 and r["cpu_s"] > 0 and r["batch"] == 1
        assert r["rounds"] == 2 and len(r["times_s"]) == 2  # one timed step per round, pooled
        assert r["ratio_time"] == pytest.approx(r["time_s"] / att["time_s"])
        assert "peak_mem_bytes" not in r and "ratio_mem" not in r  # --no-mem
        if row != "attention":
            assert r["selected_fraction"] == pytest.approx(0.125, abs=0.126 if row == "sparse_random" else 1e-6)
    assert rows[("sparse_learned", 64)]["build_kwargs"] == {"budget": 0.125, "train_selection": "topk"}
    kinds = {(t["row"], t["kind"]) for t in result["targets"]}
    assert kinds == {(r, k) for r in bench.SPARSE for k in ("time", "mem", "time_trend", "mem_trend")}
    for t in result["targets"]:
        if t["kind"] == "time":
            assert t["seq_len"] == 64 and t["met"] == (t["value"] <= bench.TARGET_RATIO)
        if t["kind"] == "mem":
            assert t["met"] is None  # nothing measured
    assert result["targets_met"] + result["targets_missed"] + result["targets_undecided"] == len(result["targets"])
    for key in ("cpu", "cores", "torch", "threads"):
        assert result["machine"][key]
    printed = json.loads(capfd.readouterr().out)
    assert printed == json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert "| sparse_programmatic | 64 | 0.125 |" in md.read_text()


def test_programmatic_ids_repeat_exactly_the_budget():
    from neox_zoology.mixers.sparse import programmatic_selection

    ids = bench.repeat_token_ids(3, 256, 0.125)
    assert programmatic_selection(ids).sum(1).tolist() == [32, 32, 32]


def test_one_subprocess_memory_measurement():
    ns = bench.parse(TINY[:6] + ["--seq-len", "64", "--repeats", "1", "--warmup", "1"])
    assert ns.rounds == 2
    assert bench.parse(["--seq-len", "2048", "--seq-len", "8192"]).seq_len == [2048, 8192]
    r = bench.run_sub("sparse_learned", 64, ns, threads=1)
    assert "error" not in r, r.get("error")
    assert r["time_s"] > 0 and r["peak_mem_bytes"] >= 0 and r["selected_fraction"] == 0.125


def test_targets_compare_the_largest_length_and_the_trend():
    results = [
        {"row": "attention", "seq_len": 2048, "batch": 4, "time_s": 4.0, "cpu_s": 4.0, "peak_mem_bytes": 100},
        {"row": "sparse_random", "seq_len": 2048, "batch": 4, "time_s": 2.0, "cpu_s": 2.0, "peak_mem_bytes": 40},
        {"row": "attention", "seq_len": 8192, "batch": 4, "time_s": 40.0, "cpu_s": 40.0, "peak_mem_bytes": 400},
        {"row": "sparse_random", "seq_len": 8192, "batch": 4, "time_s": 12.0, "cpu_s": 12.0, "peak_mem_bytes": 200},
    ]
    bench.add_ratios(results)
    t = {x["kind"]: x for x in bench.targets(results)}
    assert t["time"]["value"] == pytest.approx(0.3) and t["time"]["met"] is True
    assert t["mem"]["value"] == pytest.approx(0.5) and t["mem"]["met"] is False
    assert t["time_trend"]["met"] is True and t["mem_trend"]["met"] is False  # 0.4 -> 0.5 rises


def test_rounds_pool_the_timed_steps_and_keep_the_largest_memory():
    runs = [{"row": "sparse_random", "time_s": 2.0, "times_s": [1.0, 3.0], "cpu_s": 1.0, "cpu_times_s": [1.0, 1.0],
             "peak_mem_bytes": 10},
            {"row": "sparse_random", "time_s": 9.0, "times_s": [9.0, 10.0], "cpu_s": 2.0, "cpu_times_s": [2.0, 2.0],
             "peak_mem_bytes": 30},
            {"row": "sparse_random", "error": "exit 1"}]
    r = bench.pool_rounds(runs)
    assert r["times_s"] == [1.0, 3.0, 9.0, 10.0] and r["time_s"] == 6.0 and r["cpu_s"] == 1.5
    assert r["peak_mem_bytes"] == 30 and r["rounds"] == 2


def test_bad_options_are_refused():
    for argv in (["--budget", "0"], ["--rows", "attention,sparse_magic"], ["--hidden", "30", "--heads", "4"]):
        with pytest.raises(SystemExit):
            bench.parse(argv)

"""bench.preprocess and bench.bigrams: tiny runs whose JSON has the figures the notes quote."""
from __future__ import annotations

import json

import pytest
from test_preprocess import train_tiny_bpe

from bench import bigrams as bench_bigrams
from bench import preprocess as bench_preprocess


def test_preprocess_bench_reports_throughput_ratios_and_equal_outputs(tmp_path, capsys):
    tiny = train_tiny_bpe(tmp_path / "bpe")
    out, md = tmp_path / "sub" / "pre.json", tmp_path / "pre.md"
    result = bench_preprocess.main(["--mb", "0.3", "--rounds", "1", "--workers", "1,2", "--vocab-file",
                                    tiny["vocab"], "--merge-file", tiny["merges"], "--out", str(out), "--md", str(md)])

    assert json.loads(capsys.readouterr().out) == json.loads(out.read_text()) == json.loads(json.dumps(result))
    s, ratios = result["summary"], result["ratios"]
    assert set(s) == {"peer", "ours_1", "ours_2"}
    for row in s.values():
        assert row["tokens_per_s"] == pytest.approx(result["input"]["tokens"] / row["median_seconds"])
    assert ratios["ours_2_vs_ours_1"] == pytest.approx(s["ours_2"]["tokens_per_s"] / s["ours_1"]["tokens_per_s"])
    assert ratios["ours_1_vs_peer"] == pytest.approx(s["ours_1"]["tokens_per_s"] / s["peer"]["tokens_per_s"])
    assert ratios["ours_2_vs_ours_1_cpu_bound"] == pytest.approx(
        s["ours_1"]["median_cpu_seconds"] / (s["ours_2"]["median_cpu_seconds"] / 2))
    assert all(row["cores_used"] > 0 for row in s.values())
    assert result["target_met"]["ours_2_vs_ours_1"] == (ratios["ours_2_vs_ours_1"] >= 1.7)
    assert result["target_met"]["ours_vs_peer"] == (max(ratios["ours_1_vs_peer"], ratios["ours_2_vs_peer"]) >= 1.0)
    assert result["identical_output"] and all(len(runs) == 1 for runs in result["runs"].values())
    assert result["input"]["documents"] > 20 and result["machine"]["cores"] >= 1
    assert "2 workers / 1 worker" in md.read_text()


def test_bigrams_bench_reports_rates_memory_and_the_ten_billion_estimate(tmp_path, capsys):
    out, md = tmp_path / "bg.json", tmp_path / "bg.md"
    result = bench_bigrams.main(["--eval-bigrams", "3000", "--train-tokens", "200000", "--repeats", "1",
                                 "--out", str(out), "--md", str(md)])
    assert json.loads(capsys.readouterr().out) == json.loads(out.read_text())
    s = result["summary"]
    assert result["data"]["distinct_eval_bigrams"] == 3000
    assert {r["distinct_eval_bigrams"] for runs in result["runs"].values() for r in runs} == {3000}
    assert result["runs"]["ours_all"][0]["train_tokens"] == 200_000
    assert result["runs"]["ours_quarter"][0]["train_tokens"] == result["runs"]["peer_quarter"][0]["train_tokens"] == 50_000
    assert s["ten_billion_tokens_s"] == pytest.approx(10e9 / s["ours_tokens_per_s"])
    assert 0 < s["hit_fraction"] <= 1 and 0 < s["ours_peak_rss_bytes_all"] < 1 << 30
    assert result["target_met"]["tokens_per_s"] == (s["ours_tokens_per_s"] >= 20e6)
    assert result["target_met"]["peak_rss_bytes"] == (max(s["ours_peak_rss_bytes_all"], s["ours_peak_rss_bytes_quarter"]) < 1 << 30)
    assert "10B training tokens" in md.read_text()


def test_bench_options_are_checked(tmp_path):
    with pytest.raises(SystemExit):
        bench_preprocess.parse(["--workers", "one"])
    with pytest.raises(SystemExit):
        bench_preprocess.parse(["--vocab-file", str(tmp_path / "missing.json")])
    with pytest.raises(SystemExit):
        bench_bigrams.parse(["--repeats", "0"])

"""bench.compile on one tiny mixer: the compiled run is the eager one (same numbers), one graph, timings
and their ratio reported, and the JSON on stdout equals the file."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT


def test_tiny_compile_run_reports_a_ratio_against_eager(tmp_path):
    out = tmp_path / "res" / "compile.json"
    cmd = [sys.executable, "-m", "bench.compile", "--mixers", "baseconv_short", "--batch", "1", "--hidden", "32",
           "--heads", "2", "--seq-len", "64", "--repeats", "1", "--warmup", "0", "--threads", "1",
           "--no-warm-cache", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result == json.loads(out.read_text()) and result["benchmark"] == "compile"
    (row,) = result["results"]
    assert row["mixer"] == "baseconv_short" and row["graphs"] == 1 and row["graph_breaks"] == 0
    assert row["max_abs_diff"]["output"] < 1e-5 and row["max_abs_diff"]["input_grad"] < 1e-5
    assert row["ratio"] == pytest.approx(row["compiled_time_s"] / row["eager_time_s"])
    assert row["compile_s"] > 0 and "warm_cache_compile_s" not in row

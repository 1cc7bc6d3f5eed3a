"""bench.summary reads every committed result JSON; bench.run_all's commands are valid."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import run_all, summary

ROOT = Path(__file__).resolve().parents[1]


def test_every_committed_result_has_rows_and_no_layout_error():
    entries = summary.collect(ROOT / "bench" / "results")
    assert entries, "no benchmark results committed"
    for e in entries:
        assert e["error"] is None, (e["file"], e["error"])
        assert e["rows"], f"{e['file']}: no headline rows"
    text = summary.markdown(entries)
    for e in entries:
        assert f"| {Path(e['file']).stem} |" in text


def test_rows_follow_the_json_and_targets_are_checked(tmp_path):
    (tmp_path / "ar_eval.json").write_text(json.dumps(
        {"benchmark": "ar_eval", "ratio": 1.25, "target_ratio": 1.1, "target_met": False,
         "machine": {"cpu": "X", "cores": 2, "torch": "t", "loadavg_1min_at_start": 0.5}}))
    (tmp_path / "broken.json").write_text(json.dumps({"benchmark": "trainer_overhead", "ratio": 1.0}))
    (tmp_path / "run_all.json").write_text(json.dumps(
        {"benchmark": "run_all", "total_s": 600.0, "finished": "now",
         "steps": [{"name": "ar_eval", "seconds": 12.0, "returncode": 0},
                   {"name": "trainer_overhead", "seconds": 3.0, "returncode": 1}]}))
    text = summary.main(["--results", str(tmp_path)])
    assert "| ar_eval | AR-slice hook / plain validation pass | 1.25 | <= 1.1 | no |" in text
    assert "unexpected JSON layout: KeyError" in text  # the broken file is named, not skipped silently
    assert "10.0 min in total (ar_eval 12 s, trainer_overhead 3 s)" in text
    assert "Failed in that run: trainer_overhead" in text
    assert (tmp_path / "SUMMARY.md").read_text() == text
    assert summary._cmp(0.49, "<= 0.5") is True and summary._cmp(1.2, ">= 1.3") is False


@pytest.mark.parametrize("name,cmd", run_all.commands(Path("/tmp/results")), ids=lambda x: x if isinstance(x, str) else "")
def test_make_bench_commands_parse(name, cmd):
    r = subprocess.run([*cmd, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--out" in r.stdout

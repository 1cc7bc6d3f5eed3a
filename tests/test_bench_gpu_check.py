"""bench.gpu_check's bookkeeping: stage plans per mode, pytest counts, plan-vs-measured memory, the budget,
and the refusal without a GPU. (Its stages run end to end at toy sizes in test_gpu_kit.py.)"""
import json
import subprocess
import sys

import pytest

from bench import gpu_check
from conftest import ROOT

PYTEST_OUTPUT = """\
ssss..F.
SKIPPED [4] tests/test_fast_paths.py:215: needs a CUDA GPU and NVIDIA apex built with its fused_layer_norm_cuda extension
FAILED tests/test_fast_paths.py::test_bf16_mixer_matches_fp32[rwkv-cuda] - AssertionError: 0.2
1 failed, 3 passed, 4 skipped, 34 deselected, 15 warnings in 9.30s
"""


def test_pytest_summary_counts_and_names_failures():
    s = gpu_check.pytest_summary(PYTEST_OUTPUT)
    assert (s["failed"], s["passed"], s["skipped"], s["deselected"]) == (1, 3, 4, 34)
    assert s["failed_tests"] == ["tests/test_fast_paths.py::test_bf16_mixer_matches_fp32[rwkv-cuda]"]
    assert s["skipped_reasons"] == ["needs a CUDA GPU and NVIDIA apex built with its fused_layer_norm_cuda extension"]


@pytest.mark.parametrize("mode,names", [
    ([], ["every_mixer", "throughput", "fast_paths", "memory_plan", "mqar", "throughput_more", "compile"]),
    (["--smoke"], ["every_mixer", "throughput", "fast_paths", "memory_plan", "mqar"]),
    (["--rehearsal", "--stages", "mqar,every_mixer"], ["every_mixer", "mqar"]),
])
def test_stage_plans(mode, names, tmp_path):
    ns = gpu_check.parse(mode)
    stages = gpu_check.stages(ns, tmp_path, tmp_path)
    assert [s["name"] for s in stages] == names
    cmds = {s["name"]: s["cmd"] for s in stages}
    if "throughput" in cmds:
        configs = [cmds["throughput"][i + 1] for i, a in enumerate(cmds["throughput"]) if a == "--config"]
        assert configs == [f"configs/neox/{c}_360m.yml" for c in (["attention"] if mode else gpu_check.CORE_CONFIGS)]
        assert cmds["throughput"][cmds["throughput"].index("--checkpoint-activations") + 1] == "off"
    if "mqar" in cmds and "--rehearsal" not in mode:
        assert cmds["mqar"][cmds["mqar"].index("--config") + 1] == "paper"
    assert ns.budget_s == {(): 450, ("--smoke",): 150}.get(tuple(mode), 900)


def test_memory_is_compared_without_the_runtime_reserve():
    plan = {"a": {"peak": 12_000, "runtime_reserve": 2_000}, "b": {"peak": 12_000, "runtime_reserve": 2_000}}
    rows = [{"name": "a", "gpu_peak_mem_bytes": 10_500}, {"name": "b", "gpu_peak_mem_bytes": 12_000},
            {"name": "c", "gpu_peak_mem_bytes": 1}, {"name": "a", "error": "boom"}]
    got = gpu_check.compare_memory(plan, rows)
    assert [(g["config"], g["measured_over_planned"], g["within_15pct"]) for g in got] == [
        ("a", 1.05, True), ("b", 1.2, False)]


def test_a_stage_that_no_longer_fits_the_budget_is_skipped_and_a_failing_one_recorded(tmp_path, monkeypatch):
    plan = [{"name": "fails", "cmd": [sys.executable, "-c", "import sys; sys.exit(3)"], "timeout": 30, "min_s": 0},
            {"name": "late", "cmd": [sys.executable, "-c", "pass"], "timeout": 30, "min_s": 10**6}]
    monkeypatch.setattr(gpu_check, "stages", lambda ns, out, tmp: plan)
    monkeypatch.setattr(gpu_check, "environment", lambda: {"torch": "x", "python": "3"})
    assert gpu_check.main(["--rehearsal", "--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(s["name"], s["status"]) for s in report["stages"]] == [("fails", "exit 3"), ("late", "skipped (budget)")]
    assert "| fails | exit 3 |" in (tmp_path / "gpu_check.md").read_text()


def test_without_a_gpu_the_check_refuses_in_one_line(tmp_path):
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is visible here")
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("gpu-check: no CUDA device visible to torch")

"""bench.train_throughput: a short run of two tiny configs in a subprocess (the real trainer, one gloo rank
per measurement, each in its own process), plus the pieces that need no run."""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from bench import train_throughput as tt

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "neox" / "demo_cpu.yml"


def tiny_config(tmp_path: Path, name: str, attention_config: str) -> Path:
    """demo_cpu.yml (4 x 128, SwiGLU, ZeRO-1) with another layer pattern."""
    text = DEMO.read_text()
    old = '"attention_config": [[["baseconv", "attention"], "all"]]'
    assert old in text
    path = tmp_path / f"{name}.yml"
    path.write_text(text.replace(old, f'"attention_config": {attention_config}'))
    return path


def test_smoke_run_reports_rows_ratios_and_a_failed_config(tmp_path):
    attn = tiny_config(tmp_path, "tiny_attention", '[[["attention"], "all"]]')
    conv = tiny_config(tmp_path, "tiny_baseconv", '[[["baseconv"], "all"]]')
    missing = tmp_path / "missing.yml"
    out, md = tmp_path / "res" / "tput.json", tmp_path / "res" / "tput.md"
    cmd = [sys.executable, "-m", "bench.train_throughput", "--config", str(attn), "--config", str(conv),
           "--config", str(missing), "--num-layers", "2", "--seq-len", "128", "--warmup", "1", "--steps", "1",
           "--vocab", "512", "--threads", "1", "--out", str(out), "--md", str(md)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # stdout is the JSON and nothing else
    assert result == json.loads(out.read_text())

    assert result["benchmark"] == "train_throughput"
    assert (result["seq_lens"], result["micro_batch"], result["steps"], result["warmup"]) == ([128], 1, 1, 1)
    assert result["num_layers_override"] == 2
    for key in ("cpu", "cores", "threads", "torch", "deepspeed", "loadavg_1min_at_start", "loadavg_1min_at_end"):
        assert key in result["machine"], key
    assert result["machine"]["threads"] == 1
    decision = result["checkpoint_activations"]["128"]
    assert decision["mode"] == "auto" and decision["checkpoint_activations"] is False  # tiny: fits easily
    assert decision["estimated_peak_without_bytes"] > decision["estimated_peak_with_bytes"] > 0

    rows = {r["name"]: r for r in result["results"]}
    assert set(rows) == {"tiny_attention", "tiny_baseconv", "missing"}
    # a config that cannot load is a failed row; the others still ran
    assert "not found" in rows["missing"]["error"]
    assert result["failed"] == ["missing L=128"]
    assert rows["missing"]["x_attention"] is None

    a, b = rows["tiny_attention"], rows["tiny_baseconv"]
    assert (a["kind"], b["kind"]) == ("attention", "baseconv")
    assert a["layer_types"] == {"attention": 2} and b["layer_types"] == {"baseconv": 2}
    for r in (a, b):
        assert r["engine"] == "DeepSpeedEngine" and r["zero_stage"] == 1 and r["dtype"] == "fp32"
        assert r["num_layers"] == 2 and r["hidden_size"] == 128 and r["seq_len"] == 128
        assert r["checkpoint_activations"] is False
        assert len(r["step_s_all"]) == 1 and r["step_s"] == statistics.median(r["step_s_all"]) > 0
        assert r["tokens_per_step"] == 128
        assert r["tokens_per_s"] == pytest.approx(128 / r["step_s"])
        assert r["tflops"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"] / 1e12)
        assert len(r["cpu_s_all"]) == 1 and r["tokens_per_cpu_s"] == pytest.approx(128 / r["cpu_s"])
        assert r["parameters"] > 0 and r["flops_per_token"] > 0
        assert r["peak_mem_bytes"] > 0 and r["saved_for_backward_bytes"] > 0
        assert r["device"] == "cpu" and r["mfu"] is None and r["gpu_peak_mem_bytes"] is None  # no device peak on CPU
        assert all(0 < loss < 20 for loss in r["losses"]["warmup"] + r["losses"]["timed"])
        comps = r["breakdown"]["components"]
        mixer = next(k for k in comps if k.startswith("mixer:"))
        assert comps[mixer]["layers"] == 2 and comps["mlp"]["layers"] == 2 and comps["norm"]["layers"] == 4
        assert comps[mixer]["total_s"] > 0 and comps["mlp"]["total_s"] > 0 and comps["optimizer"]["total_s"] > 0
        wall = r["breakdown"]["wall_s"]
        phases = ("forward_s", "loss_s", "backward_s", "optimizer_s")
        assert wall["step_s"] == pytest.approx(sum(wall[k] for k in phases))
        assert sum(c["total_s"] for c in comps.values()) == pytest.approx(wall["step_s"])

    # ratios are ratios of the measured tokens/s, against the peers of the same run
    assert a["x_attention"] == 1.0 and b["x_baseconv"] == 1.0
    assert b["x_attention"] == pytest.approx(b["tokens_per_s"] / a["tokens_per_s"])
    assert a["x_baseconv"] == pytest.approx(a["tokens_per_s"] / b["tokens_per_s"])
    assert b["x_attention_cpu"] == pytest.approx(b["tokens_per_cpu_s"] / a["tokens_per_cpu_s"])
    (target,) = result["targets"]
    assert target["config"] == "tiny_baseconv" and target["threshold"] == 1.3
    assert target["value"] == b["x_attention"] and target["meets"] == (b["x_attention"] >= 1.3)
    assert target["value_cpu"] == b["x_attention_cpu"] and target["meets_cpu"] == (b["x_attention_cpu"] >= 1.3)
    assert result["meets"] == target["meets"]

    table = md.read_text()
    assert "| tiny_attention | 2 |" in table and "| tiny_baseconv | 2 |" in table
    assert f"{b['x_attention']:.2f}" in table and "failed: ConfigError" in table
    assert "cut to 2 layers" in table
    assert table.startswith("# Training throughput through the trainer (fp32, CPU)") and "MFU" not in table

    # the same result as a GPU run would report it: MFU column and the device's peak memory
    gpu = json.loads(json.dumps(result))
    for r in gpu["results"]:
        if "error" not in r:
            r.update(device="NVIDIA H100 80GB HBM3", mfu=0.412, gpu_peak_mem_bytes=12_345_000_000)
    gpu["dtype"] = "bf16"
    gtable = tt.markdown(gpu)
    assert gtable.startswith("# Training throughput through the trainer (bf16, NVIDIA H100 80GB HBM3)")
    assert "| MFU | peak memory GB (GPU) |" in gtable and "| 41.2% | 12.35 |" in gtable


def test_ratios_and_targets_from_rows():
    rows = [
        {"name": "attention_160m", "kind": "attention", "seq_len": 2048, "tokens_per_s": 100.0},
        {"name": "baseconv_160m", "kind": "baseconv", "seq_len": 2048, "tokens_per_s": 140.0},
        {"name": "baseconv_random_160m", "kind": "sparse", "seq_len": 2048, "tokens_per_s": 112.0},
        {"name": "hyena_160m", "kind": "other", "seq_len": 2048, "error": "exit status -9"},
        {"name": "attention_160m", "kind": "attention", "seq_len": 8192, "tokens_per_s": 20.0},
        {"name": "baseconv_160m", "kind": "baseconv", "seq_len": 8192, "tokens_per_s": 26.0},
    ]
    tt.add_ratios(rows)
    assert rows[1]["x_attention"] == pytest.approx(1.4) and rows[5]["x_attention"] == pytest.approx(1.3)
    assert rows[2]["x_baseconv"] == pytest.approx(0.8) and rows[2]["x_attention"] == pytest.approx(1.12)
    assert rows[3]["x_attention"] is None and rows[1]["x_attention_cpu"] is None  # no CPU times given
    got = {(t["config"], t["seq_len"], t["threshold"] if t["threshold"] in (1.3, 0.85) else "grow"): t["meets"]
           for t in tt.targets(rows)}
    assert got == {("baseconv_160m", 2048, 1.3): True, ("baseconv_160m", 8192, 1.3): True,
                   ("baseconv_160m", 8192, "grow"): False,  # 1.3 at 8192 is not larger than 1.4 at 2048
                   ("baseconv_random_160m", 2048, 0.85): False}

    # measured on a GPU: the GPU thresholds, and attention's MFU is a target of its own
    gpu = [dict(r, device="NVIDIA H100 80GB HBM3", mfu=0.43 if r["kind"] == "attention" else 0.3)
           for r in rows if r["seq_len"] == 2048 and "error" not in r]
    tt.add_ratios(gpu)
    got = {t["target"]: (t["value"], t["meets"]) for t in tt.targets(gpu)}
    assert got == {"attention_160m MFU >= 40% at L=2048": (0.43, True),
                   "baseconv_160m tokens/s >= 1.15x attention at L=2048": (pytest.approx(1.4), True),
                   "baseconv_random_160m tokens/s >= 0.85x baseconv at L=2048": (pytest.approx(0.8), False)}


def test_resampled_depth_keeps_every_type_spread_out():
    learned = ["baseconv"] * 4 + ["sparse_learned"] + ["baseconv"] * 7 + ["sparse_learned"] + ["baseconv"] * 7 + \
        ["sparse_learned"] + ["baseconv"] * 3
    assert tt.resample_layer_types(learned, 24) == learned
    assert tt.resample_layer_types(learned, 4) == ["baseconv", "baseconv", "sparse_learned", "baseconv"]
    twelve = tt.resample_layer_types(learned, 12)
    assert [i for i, t in enumerate(twelve) if t != "baseconv"] == [3, 9]
    assert tt.resample_layer_types(["attention"] * 12, 3) == ["attention"] * 3
    assert tt.resample_layer_types(["baseconv", "attention"] * 2, 2) == ["baseconv", "attention"]
    with pytest.raises(ValueError, match="cannot hold"):
        tt.resample_layer_types(learned, 1)


def test_auto_checkpointing_estimate_for_the_24_layer_model():
    """BaseConv 160M at micro-batch 1: fits without checkpointing at 2048, needs it at 8192 (~20 GB of
    activations alone there)."""
    config = "configs/neox/baseconv_160m.yml"
    ns = argparse.Namespace(micro_batch=1, sets=[], vocab=50257, num_layers=None, bf16=False)
    est = {}
    for L in (2048, 8192):
        args = tt.load_args(config, tt.override_sets(config, L, ns, checkpoint=False))
        assert (args.seq_length, args.dtype_name, args.pipe_parallel_size, args.global_batch) == (L, "fp32", 0, 1)
        params = tt.parameter_count(args)
        assert 160e6 < params < 175e6
        est[L] = tt.estimated_peak_bytes(args, params, 1, False), tt.estimated_peak_bytes(args, params, 1, True)
    assert est[2048][0] < 0.7 * 24e9 < est[8192][0]
    assert est[8192][1] < 0.5 * est[8192][0]


def test_bad_options_are_refused():
    for argv in (["--steps", "0"], ["--warmup", "0"], ["--num-layers", "0"], ["--seq-len", "1"],
                 ["--checkpoint-activations", "maybe"]):
        with pytest.raises(SystemExit):
            tt.parse(argv)
    for bad in ("8192", "x=attention_160m", "8192="):
        with pytest.raises(SystemExit):
            tt.parse(["--only-at", bad])
    ns = tt.parse(["--seq-len", "2048", "8192", "--only-at", "8192=attention_160m,baseconv_160m"])
    assert ns.seq_len == [2048, 8192] and ns.checkpoint_activations == "auto" and ns.micro_batch == 1
    assert ns.only_at == {8192: ["attention_160m", "baseconv_160m"]}
    rows, decisions = tt.plan(ns)  # configs only loaded here (meta-device parameter counts), nothing run
    assert [r["name"] for r in rows if r["seq_len"] == 2048] == [Path(c).stem for c in tt.DEFAULT_CONFIGS]
    assert [r["name"] for r in rows if r["seq_len"] == 8192] == ["attention_160m", "baseconv_160m"]
    assert all("error" not in r for r in rows)
    assert {L: all(r["checkpoint_activations"] == decisions[str(L)]["checkpoint_activations"]
                   for r in rows if r["seq_len"] == L) for L in (2048, 8192)} == {2048: True, 8192: True}


def test_bf16_flag_switches_the_override_to_deepspeed_bf16():
    ns = tt.parse(["--config", str(DEMO), "--seq-len", "128"])
    assert "bf16={enabled: false}" in tt.override_sets(str(DEMO), 128, ns, False)
    ns = tt.parse(["--config", str(DEMO), "--seq-len", "128", "--bf16"])
    sets = tt.override_sets(str(DEMO), 128, ns, False)
    assert "bf16={enabled: true}" in sets and "fp16={enabled: false}" in sets
    assert tt.load_args(str(DEMO), sets).dtype_name == "bf16"

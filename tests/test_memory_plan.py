"""The dry run's per-rank memory plan (neox_zoology/training/memory/): accounting rules, activation
measurement on the meta device, the CLI output, and the estimate against a real CPU training run."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from neox_zoology.config import build_args
from neox_zoology.training import memory
from neox_zoology.tokenizer import resolve_vocab

TINY = {
    "num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 64, "vocab_size": 1000,
    "attention_config": [[["attention"], "all"]], "norm": "rmsnorm", "activation": "swiglu", "pos_emb": "rotary",
    "intermediate_size": 576,  # GPT-NeoX's size for 192-wide gated projections (8d/3 rounded to 64)
    "train_micro_batch_size_per_gpu": 2,
}


def make(world=1, **keys):
    args = build_args({**TINY, **keys}, world_size=world)
    resolve_vocab(args)
    return args


def plan(world=1, target="cuda", **keys):
    return memory.plan(make(world, **keys), target=target)


# ------------------------------------------------------------------ parameters, gradients, optimizer
def test_zero_1_divides_optimizer_state_by_dp_and_keeps_whole_gradients():
    args = make(zero_optimization={"stage": 1}, bf16={"enabled": True})
    n, big = 10_000_000, 1_000_000
    one, eight = memory.state_bytes(args, n, big, 1), memory.state_bytes(args, n, big, 8)
    assert one["optimizer"] == 12 * n  # fp32 master + Adam m, v
    assert eight["optimizer"] == 12 * n // 8
    assert one["parameters"] == eight["parameters"] == 2 * n  # bf16, not partitioned
    bucket = 2 * memory.DEFAULT_REDUCE_BUCKET
    assert one["gradients"] == eight["gradients"] == 2 * n + bucket


def test_zero_2_also_divides_gradients():
    args = make(zero_optimization={"stage": 2, "reduce_bucket_size": 1000}, bf16={"enabled": True})
    n, big = 10_000_000, 1_000_000
    one, eight = memory.state_bytes(args, n, big, 1), memory.state_bytes(args, n, big, 8)
    assert eight["gradients"] == 2 * n // 8 + 2 * 1000 + 2 * big  # own partition + bucket + one in flight
    assert one["gradients"] - eight["gradients"] == 2 * n - 2 * n // 8
    assert eight["optimizer"] == 12 * n // 8


def test_zero_0_paths_follow_deepspeed():
    n = 1000
    fp32 = memory.state_bytes(make(), n, 10, 4)
    assert (fp32["parameters"], fp32["gradients"], fp32["optimizer"]) == (4 * n, 4 * n, 8 * n)
    bf16_plain = make(bf16={"enabled": True})
    assert memory.engine_path(bf16_plain) == "fp16_unfused"
    s = memory.state_bytes(bf16_plain, n, 10, 4)
    assert (s["parameters"], s["gradients"], s["optimizer"], s["step_transient"]) == (2 * n, 2 * n, 12 * n, 4 * n)
    bf16_pipe = make(bf16={"enabled": True}, pipe_parallel_size=1)
    assert memory.engine_path(bf16_pipe) == "bf16_optimizer"
    assert memory.state_bytes(bf16_pipe, n, 10, 4)["optimizer"] == 12 * n // 4  # BF16_Optimizer partitions
    assert memory.engine_path(make(zero_optimization={"stage": 1})) == "zero"


def test_tensor_parallelism_splits_parallel_layers_and_replicates_the_rest():
    keys = dict(norm="layernorm", activation="gelu", pos_emb="none", intermediate_size=256)
    one, two = plan(**keys), plan(world=2, model_parallel_size=2, **keys)
    d, ffn, layers = 64, 256, 4
    per_layer_split = (3 * d * d + 3 * d) + d * d + (d * ffn + ffn) + ffn * d  # column/row weights, column biases
    per_layer_whole = d + d + 2 * (2 * d)  # row-parallel biases (attention out, MLP down), two LayerNorms
    vocab_1 = math.ceil(1000 / 128) * 128
    vocab_2 = math.ceil(1000 / 256) * 256  # padded to a multiple of 128 x TP
    assert one["parameters_count"] == layers * (per_layer_split + per_layer_whole) + vocab_1 * d + 2 * d
    assert two["parameters_count"] == layers * (per_layer_split // 2 + per_layer_whole) + vocab_2 // 2 * d + 2 * d
    assert not torch.distributed.is_initialized()  # the fake TP group is gone again


def test_pipeline_plans_every_stage_and_reports_the_busiest():
    p = plan(world=2, pipe_parallel_size=2, num_layers=5, gradient_accumulation_steps=4)
    first, last = p["stages"]
    # DeepSpeed's type:ZooBlock partition of 5 blocks: 3 with the embedding, 2 with the tied head
    assert first["layers"] == "embedding, 3 x attention"
    assert last["layers"] == "input from the previous stage, 2 x attention, final norm + LM head + loss"
    assert p["peak"] == max(first["peak"], last["peak"])
    assert first["runtime_reserve"] == last["runtime_reserve"] == memory.RUNTIME_RESERVE
    assert p["stage"] == (0 if first["peak"] >= last["peak"] else 1)
    # the tied head keeps its own embedding copy: both stages hold the 1024 x 64 matrix
    whole = plan(num_layers=5)
    assert first["parameters_count"] + last["parameters_count"] == whole["parameters_count"] + 1024 * 64
    # 1F1B: stage 0 keeps two micro-batches in flight, the last stage one
    assert (first["micro_batches_in_flight"], last["micro_batches_in_flight"]) == (2, 1)
    single = plan(world=2, pipe_parallel_size=2, num_layers=5, gradient_accumulation_steps=1)["stages"][0]
    assert single["micro_batches_in_flight"] == 1 and first["activations"] == 2 * single["activations"]


def test_world_size_must_divide_into_tp_times_pp():
    with pytest.raises(ValueError, match="not divisible"):
        memory.layout_of(make(world=2, model_parallel_size=2), world_size=3)


# --------------------------------------------------------------------------------- activations
def test_activations_scale_linearly_with_micro_batch():
    a2, a4 = plan(train_micro_batch_size_per_gpu=2), plan(train_micro_batch_size_per_gpu=4)
    a8 = plan(train_micro_batch_size_per_gpu=8)
    assert a4["activations"] == pytest.approx(2 * a2["activations"], rel=0.02)
    assert a8["activations"] == pytest.approx(2 * a4["activations"], rel=0.02)
    assert a8["transient"] > a4["transient"]
    assert a8["parameters"] == a2["parameters"] and a8["optimizer"] == a2["optimizer"]


def test_attention_counts_the_fused_kernel_not_the_math_path():
    """Doubling L doubles attention's kept activations (no [heads, L, L] probabilities kept)."""
    short, long = plan(seq_length=256, vocab_size=64), plan(seq_length=512, vocab_size=64)
    s, l = short["stages"][0]["saved_by_layer_type"]["attention"], long["stages"][0]["saved_by_layer_type"]["attention"]
    assert l / s == pytest.approx(2.0, rel=0.02)
    # what a block keeps is O(L * h) per token: well below one [b, heads, L, L] fp32 score matrix per layer
    scores = 2 * 4 * 512 * 512 * 4
    assert l / 4 < scores


def test_activation_checkpointing_keeps_only_group_inputs():
    plain = plan(pipe_parallel_size=0)
    ckpt1 = plan(pipe_parallel_size=0, checkpoint_activations=True, checkpoint_num_layers=1)
    ckpt2 = plan(pipe_parallel_size=0, checkpoint_activations=True, checkpoint_num_layers=2)
    hidden = 2 * 64 * 64 * 4  # one [s, b, h] fp32 activation
    blocks = plain["stages"][0]["saved_by_layer_type"]["attention"]
    assert ckpt1["activations"] < plain["activations"] - blocks / 2
    # one group output per group instead of every block's saved tensors
    assert plain["activations"] - ckpt1["activations"] == pytest.approx(blocks - 4 * hidden, rel=0.05)
    assert ckpt2["activations"] == ckpt1["activations"] - 2 * hidden
    # the pipeline engine checkpoints every block on its own, whatever checkpoint_num_layers says
    assert plan(pipe_parallel_size=1, checkpoint_activations=True, checkpoint_num_layers=2)["checkpoint_group"] == 1


def test_chunked_lm_head_keeps_no_full_logits():
    whole = plan(vocab_size=8000, train_micro_batch_size_per_gpu=16)
    chunked = plan(vocab_size=8000, train_micro_batch_size_per_gpu=16, lm_head_chunk_tokens=16)
    logits = 16 * 64 * 8064 * 4  # [tokens, vocab] fp32
    head_whole = whole["stages"][0]["saved_by_layer_type"]["head"]
    head_chunked = chunked["stages"][0]["saved_by_layer_type"]["head"]
    assert head_whole >= logits  # the log-softmax the unchunked loss keeps
    assert head_chunked < logits / 8
    assert chunked["transient"] < whole["transient"] / 4


@pytest.mark.parametrize("keys", [
    dict(attention_config=[[["attention", "baseconv"], "all"]], baseconv={"kernel_sizes": [3, -1]}),
    dict(attention_config=[[["hyena", "h3", "long_conv", "rwkv4"], "all"]]),
    dict(vocab_size=8000, train_micro_batch_size_per_gpu=16),
    dict(attention_config=[[["mamba2"], "all"]], mamba2={"head_dim": 16, "d_state": 16}),
    dict(attention_config=[[["gated_deltanet", "mamba2"], "all"]], mamba2={"head_dim": 16, "mlp": True}),
], ids=["attention_baseconv", "hyena_h3_long_conv_rwkv", "large_head", "mamba2_no_mlp", "gated_deltanet_mamba2"])
def test_composed_stage_matches_the_whole_model_on_meta(keys):
    """The plan measures one block per kind and composes the stage; running every layer of the model in
    one forward and backward gives the same kept bytes and the same peak."""
    from neox_zoology.model.gpt import SequentialGPT, lm_loss
    from neox_zoology.training.engine import model_config

    args = make(pipe_parallel_size=0, **keys)
    p = memory.plan(args)["stages"][0]
    with torch.device("meta"):
        model = SequentialGPT(args, model_config(args, perform_initialization=False))
    model.train()
    embedded = {}
    model.layers[0].register_forward_hook(lambda module, inputs, out: embedded.update(h0=out[0]) and None)
    b = args.train_micro_batch_size_per_gpu
    mode = memory.LiveStorages()
    with memory.target_kernels("cuda"), mode:
        tokens = torch.zeros(b, 64, dtype=torch.long, device="meta")
        loss = lm_loss(model(tokens), (tokens, torch.ones(b, 64, device="meta")))
        kept, forward_peak = mode.live, mode.peak
        mode.reset_peak()
        torch.autograd.grad(loss, [embedded.pop("h0")])  # down to the embedding output, as the plan
    assert kept == p["activations"]
    assert max(forward_peak, mode.peak) == p["activation_peak"]


@pytest.mark.parametrize("section", [{}, {"mlp": True}], ids=["no_mlp", "mlp"])
def test_mamba_blocks_plan_what_the_model_builds(section):
    """MLP-less Mamba blocks (and with the MLP): the plan counts the parameters the model builds and the
    activations it keeps exactly; the peak within 1% (the checkpointed scan's backward reuses gradient
    buffers the measurement, which holds the incoming gradient, cannot hand over)."""
    from neox_zoology.model.gpt import SequentialGPT, lm_loss
    from neox_zoology.training.engine import model_config

    args = make(pipe_parallel_size=0, attention_config=[[["mamba"], "all"]], mamba=section)
    p = memory.plan(args)
    with torch.device("meta"):
        model = SequentialGPT(args, model_config(args, perform_initialization=False))
    assert p["parameters_count"] == sum(t.numel() for t in model.parameters())
    model.train()
    embedded = {}
    model.layers[0].register_forward_hook(lambda module, inputs, out: embedded.update(h0=out[0]) and None)
    mode = memory.LiveStorages()
    with memory.target_kernels("cuda"), mode:
        tokens = torch.zeros(2, 64, dtype=torch.long, device="meta")
        loss = lm_loss(model(tokens), (tokens, torch.ones(2, 64, device="meta")))
        kept, forward_peak = mode.live, mode.peak
        mode.reset_peak()
        torch.autograd.grad(loss, [embedded.pop("h0")])
    assert kept == p["stages"][0]["activations"]
    assert max(forward_peak, mode.peak) == pytest.approx(p["stages"][0]["activation_peak"], rel=0.01)


def test_sparse_layers_that_read_values_are_measured_on_the_cpu():
    keys = dict(attention_config=[[["baseconv", "sparse_learned"], "all"]], baseconv={"kernel_sizes": [3]})
    two, four = plan(**keys), plan(train_micro_batch_size_per_gpu=4, **keys)
    assert any(n.startswith("sparse_learned: measured on the CPU at micro-batch 1") for n in two["notes"])
    sparse2 = two["stages"][0]["saved_by_layer_type"]["sparse_learned"]
    assert sparse2 > 0 and four["stages"][0]["saved_by_layer_type"]["sparse_learned"] == 2 * sparse2
    assert four["activations"] == pytest.approx(2 * two["activations"], rel=0.02)


def test_live_storages_follows_allocations_and_frees():
    mode = memory.LiveStorages()
    x = torch.ones(1000)  # made outside: not counted
    with mode:
        x.mul_(1)  # in place on an outside storage: nothing new
        y = x * 2  # 4000 bytes
        z = y + 1  # 4000 more
        view = z[10:]  # a view: no new storage
        assert mode.live == 8000
        del y
        w = z * 3
        assert mode.live == 8000 and mode.peak == 8000
        del z  # the view keeps the storage alive
        assert mode.live == 8000
        del view
        assert mode.live == 4000
    del w
    assert mode.live == 0 and mode.peak == 8000


# ---------------------------------------------------------------------------------------- the CLI
def run_cli(*argv, env=None):
    import os

    environment = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    environment.update(env or {})
    return subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=environment)


@pytest.mark.slow
def test_dry_run_prints_the_memory_table_and_json():
    r = run_cli("configs/neox/attention_360m.yml", "--dry-run", "--world-size", "8")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    mem = out["memory"]
    layout = (mem["world_size"], mem["tp"], mem["pp"], mem["dp"], mem["zero_stage"], mem["dtype"])
    assert layout == (8, 1, 1, 8, 1, "bf16")
    assert mem["micro_batch"] == 8 and mem["parameters_count"] == out["parameters"]
    assert 0 <= mem["parameters"] - 2 * out["parameters"] < 2**20  # bf16, plus the fp32 rotary buffers
    assert mem["optimizer"] == 12 * math.ceil(out["parameters"] / 8)  # ZeRO 1 over 8 ranks
    assert mem["total"] == mem["parameters"] + mem["gradients"] + mem["optimizer"] + mem["activations"]
    assert mem["peak"] == mem["total"] + mem["transient"] + mem["runtime_reserve"]
    for name, cap in memory.GPUS:
        assert mem["fits"][name]["headroom_bytes"] == cap - mem["peak"]
        assert mem["fits"][name]["fits"] == (cap >= mem["peak"])
        verdict = "yes" if mem["fits"][name]["fits"] else "no"
        assert f"fits {name}: {verdict} (headroom {mem['fits'][name]['headroom_bytes'] / 2**30:.1f} GiB)" in r.stdout
    assert 16 * 2**30 < mem["activations"] < 32 * 2**30  # 24 layers x 8 x 2048 tokens of a 1024-wide model
    for row in ("parameters", "gradients", "optimizer state", "activations", "total", "transient peak", "peak"):
        assert any(line.strip().startswith(row) for line in r.stdout.splitlines()), row
    assert "TP 1 x PP 1 x DP 8 = 8 GPUs" in r.stdout


def test_dry_run_world_size_defaults_to_one_replica_and_needs_dry_run(tmp_path, capsys, monkeypatch):
    from neox_zoology.training import cli

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = tmp_path / "tp2.yml"
    cfg.write_text(json.dumps({**TINY, "model_parallel_size": 2}))
    assert cli.main([str(cfg), "--dry-run"]) == 0
    mem = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["memory"]
    assert (mem["world_size"], mem["tp"], mem["dp"]) == (2, 2, 1)  # one data-parallel replica
    assert cli.main([str(cfg), "--dry-run", "--world-size", "6"]) == 0
    mem = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["memory"]
    assert (mem["world_size"], mem["tp"], mem["dp"]) == (6, 2, 3)
    monkeypatch.setenv("WORLD_SIZE", "4")  # under the launcher
    assert cli.main([str(cfg), "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["memory"]["dp"] == 2
    assert cli.main([str(cfg), "--dry-run", "--world-size", "3"]) == 2  # not a multiple of TP
    assert "do not divide into model_parallel_size 2" in capsys.readouterr().err
    assert cli.main([str(cfg), "--world-size", "4"]) == 2
    assert "--world-size only goes with --dry-run" in capsys.readouterr().err
    assert not torch.distributed.is_initialized()


# ----------------------------------------------------------------- against a real run on the CPU
@pytest.mark.slow
def test_estimate_within_25_percent_of_a_measured_cpu_run():
    """Our trainer (build_engine + train_step, fp32, ZeRO 0) in a fresh process: peak RSS over the RSS
    before the model is built, against the plan with the CPU kernels (see bench/memory_plan.py)."""
    from bench import memory_plan

    ns = memory_plan.parse(["--case", "plain", "--steps", "1", "--threads", "1",
                            "--set", "seq_length=256", "--set", "max_position_embeddings=256",
                            "--set", "train_micro_batch_size_per_gpu=4"])
    rows = []
    for _ in range(2):  # a second fresh process only when the first is out: a wrong plan fails both
        (row,) = memory_plan.run(ns)["results"]
        rows.append((row["measured_peak_bytes"], row["estimated_peak_bytes"], row["ratio"]))
        if row["within_25pct"]:
            break
    assert row["estimated_peak_bytes"] > 150 * 2**20  # model + activations well above process noise
    assert row["within_25pct"], rows
    assert len(row["losses"]) == 1 and math.isfinite(row["losses"][0])

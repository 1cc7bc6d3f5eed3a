"""End-to-end training parity on forked gloo ranks: TP, PP, DP/ZeRO, checkpoint resume, launcher."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import ROOT, SHARED
from dist import PAPER_RUN_KEYS_OFF, assert_tp2_equals_tp1, init_tp, run_ranks
from neox_zoology.config import build_args, load


def _train(rank, raw, world, extra=None):
    from neox_zoology.training.loop import run

    args = build_args(raw, world_size=world)
    return run(args)


def train(raw, world):
    return run_ranks(_train, world, raw, world)


def losses(summary):
    return [loss for _, loss in summary["losses"]]


# ----------------------------------------------------------------------------- tensor parallel

RECALL_TYPES = ["based", "sliding_window", "gla", "gated_deltanet", "mamba"]
"""The recall-efficient mixers that followed Zoology, with Based's sliding-window partner."""


@pytest.mark.parametrize("layers", [["attention"], ["baseconv"], ["baseconv", "attention"], RECALL_TYPES])
@pytest.mark.parametrize("tied", [True, False])
def test_tp2_equals_tp1_loss_and_gradients(tiny_raw, layers, tied):
    raw = tiny_raw(attention_config=[[layers, "all"]], vocab_size=512, no_weight_tying=not tied,
                   baseconv={"kernel_sizes": [3, -1]}, num_layers=max(4, len(layers)))
    assert_tp2_equals_tp1(raw)


# ----------------------------------------------------------------------------- pipeline and data parallel


def test_pp2_equals_pp1_and_plain_engine(tiny_raw):
    raw = tiny_raw()
    plain = losses(train({**raw, "pipe_parallel_size": 0}, 1)[0])
    pp1 = losses(train({**raw, "pipe_parallel_size": 1}, 1)[0])
    pp2 = train({**raw, "pipe_parallel_size": 2}, 2)
    assert len(plain) == 5 and plain[-1] < plain[0]
    assert pp1 == pytest.approx(plain, abs=1e-5)
    for s in pp2:  # every stage reports the same (broadcast) loss
        assert losses(s) == pytest.approx(pp1, abs=1e-5)


ALL_TYPES = ["baseconv", "attention", "hyena", "h3", "rwkv4", "long_conv", "sliding_window", "baseconv", "based",
             "gla", "gated_deltanet", "mamba"]


def test_pp2_equals_pp1_for_a_hybrid_of_every_layer_type(tiny_raw):
    raw = tiny_raw(num_layers=len(ALL_TYPES), attention_config=[[ALL_TYPES, "all"]], train_iters=3,
                   sliding_window={"window": 8}, h3={"d_state": 8}, hyena={"filter_order": 8})
    pp1 = losses(train({**raw, "pipe_parallel_size": 1}, 1)[0])
    for s in train({**raw, "pipe_parallel_size": 2}, 2):
        assert losses(s) == pytest.approx(pp1, abs=1e-5)


@pytest.mark.parametrize("layers", [None, RECALL_TYPES], ids=["baseconv-attention", "recall-mixers"])
def test_tp2_pp2_trains_like_tp1(tiny_raw, layers):
    extra = {} if layers is None else {"attention_config": [[layers, "all"]], "num_layers": len(layers),
                                       "sliding_window": {"window": 8}}
    raw = tiny_raw(pipe_parallel_size=1, vocab_size=512, **extra)
    ref = losses(train(raw, 1)[0])
    out = train({**raw, "pipe_parallel_size": 2, "model_parallel_size": 2}, 4)
    assert losses(out[0]) == pytest.approx(ref, abs=1e-4)


def test_dp2_zero1_equals_dp1_same_global_batch(tiny_raw):
    raw = tiny_raw()
    dp1 = losses(train({**raw, "gradient_accumulation_steps": 2}, 1)[0])
    dp2 = train({**raw, "gradient_accumulation_steps": 1}, 2)
    for s in dp2:
        assert losses(s) == pytest.approx(dp1, abs=1e-5)


# ----------------------------------------------------------------------------- checkpoints


def test_empty_split_is_a_clear_error_not_a_hang(tiny_raw):
    from neox_zoology.config import ConfigError
    from neox_zoology.data import check_split

    args = build_args(tiny_raw(split="90,9,1"), world_size=1)  # 12 documents: the test part is empty
    with pytest.raises(ConfigError, match=r"leaves the test part of .* with 0 of its 12 documents"):
        check_split(args)


@pytest.mark.parametrize("pipe,world", [(0, 2), (2, 2)], ids=["plain-dp2", "pipe-pp2"])
def test_checkpoint_resume_continues_exactly(tiny_raw, tmp_path, pipe, world):
    raw = tiny_raw(pipe_parallel_size=pipe, train_iters=6, eval_iters=1, eval_interval=3)
    straight = train({**raw, "save": str(tmp_path / "a")}, world)[0]
    first = train({**raw, "train_iters": 3, "lr_decay_iters": 6, "save": str(tmp_path / "b")}, world)[0]
    assert (tmp_path / "b" / "latest").read_text() == "global_step3"
    assert (tmp_path / "b" / "global_step3" / "configs" / "config.yml").exists()
    resumed = train({**raw, "save": str(tmp_path / "b"), "load": str(tmp_path / "b"), "checkpoint_factor": 1,
                     "keep_last_n_checkpoints": 2, "log_dir": str(tmp_path / "logs")}, world)[0]
    assert resumed["start_iteration"] == 3
    assert losses(first) == losses(straight)[:3]
    assert losses(resumed) == losses(straight)[3:]  # bit-exact continuation (CPU, fp32)
    assert resumed["valid_losses"] == straight["valid_losses"][1:]
    assert sorted(p.name for p in (tmp_path / "b").glob("global_step*")) == ["global_step5", "global_step6"]
    assert "resumed from" in (tmp_path / "logs" / "train.log").read_text()


# ----------------------------------------------------------------------------- real NeoX config, reuse in megatron-core


def _run_args(rank, args):
    from neox_zoology.training.loop import run

    return run(args)


@pytest.mark.skipif(not (SHARED / "neox-configs").exists(), reason="../shared/neox-configs is not beside the repository")
def test_unmodified_pythia_config_trains_with_cpu_override(tiny_corpus, tmp_path):
    override = tmp_path / "o.yml"
    data = yaml.safe_load((ROOT / "configs/neox/neox_cpu_override.yml").read_text())
    data.update(data_path=tiny_corpus["data_prefix"], split="90,10,0", vocab_file=tiny_corpus["tokenizer"], save=None,
                train_iters=2, lr_decay_iters=2, data_cache_path=str(tmp_path / "cache"))
    override.write_text(yaml.safe_dump(data))
    args = load([str(SHARED / "neox-configs/pythia-70M.yml")], overrides=[str(override)], world_size=1)
    s = run_ranks(_run_args, 1, args, timeout=60)[0]
    assert len(s["losses"]) == 2 and all(l > 0 for l in losses(s))


def _megatron_layer(rank):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    from neox_zoology import registry
    from neox_zoology.model.tconfig import transformer_config

    init_tp(1)
    spec = get_gpt_layer_local_spec()
    spec.submodules.self_attention = ModuleSpec(
        module=registry.get("baseconv").module, params={"seq_length": 16, "kernel_size": -1}
    )
    config = transformer_config(hidden_size=32, num_attention_heads=4, num_layers=1)
    layer = build_module(spec, config=config, layer_number=1)
    x = torch.randn(16, 2, 32, requires_grad=True)
    out, _ = layer(x, attention_mask=None)
    out.sum().backward()
    filt = layer.self_attention.filter.outer.weight.grad
    return type(layer).__name__, tuple(out.shape), float(x.grad.abs().sum()), float(filt.abs().sum())


def test_baseconv_spec_runs_inside_megatron_transformer_layer():
    name, shape, gx, gfilter = run_ranks(_megatron_layer, 1)[0]
    assert name == "TransformerLayer" and shape == (16, 2, 32)
    assert gx > 0 and gfilter > 0  # gradients flow to the input and into BaseConv's implicit filter


# ----------------------------------------------------------------------------- the real launcher


@pytest.mark.slow
def test_deepspeed_launcher_two_ranks(tiny_raw, tmp_path):
    cfg = tmp_path / "tiny.yml"
    cfg.write_text(yaml.safe_dump(tiny_raw(train_iters=3, save=str(tmp_path / "ckpt"))))
    summary = tmp_path / "summary.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    r = subprocess.run(
        ["deepspeed", "--num_gpus", "2", "--master_port", str(__import__("dist").free_port()), "train.py", str(cfg),
         "--summary-json", str(summary)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads(summary.read_text())
    assert len(s["losses"]) == 3 and s["checkpoint"].endswith("global_step3")
    assert "DP 2" in r.stdout


@pytest.mark.parametrize("arch", ["attention", "baseconv", "hyena", "h3", "rwkv", "long_conv"])
def test_paper_70m_configs_train_on_cpu_with_short_sequences(tiny_corpus, tmp_path, arch):
    sets = ["seq_length=64", "bf16={enabled: false}", "vocab_size=null", "train_micro_batch_size_per_gpu=2",
            "train_batch_size=null", "train_iters=2", "lr_decay_iters=2", "log_interval=1", "eval_iters=0",
            "split='90,10,0'", f"data_path={tiny_corpus['data_prefix']}", "tokenizer_type=SPMTokenizer",
            f"vocab_file={tiny_corpus['tokenizer']}", f"data_cache_path={tmp_path}", "pipe_parallel_size=0"]
    args = load([str(ROOT / f"configs/neox/{arch}_70m.yml")], sets=PAPER_RUN_KEYS_OFF + sets, world_size=1)
    s = run_ranks(_run_args, 1, args)[0]
    assert len(s["losses"]) == 2 and all(0 < l < 20 for l in losses(s))


# ----------------------------------------------------------------------------- activation checkpointing


def _grads_with_dropout(rank, raw, checkpoint_layers):
    from neox_zoology.model.gpt import SequentialGPT, lm_loss
    from neox_zoology.training.engine import model_config
    from neox_zoology.tokenizer import resolve_vocab

    init_tp(1)
    args = build_args({**raw, "checkpoint_activations": bool(checkpoint_layers),
                       "checkpoint_num_layers": checkpoint_layers or 1}, world_size=1)
    resolve_vocab(args)
    model = SequentialGPT(args, model_config(args))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (2, args.seq_length), generator=g)
    labels = torch.randint(0, args.vocab_size, (2, args.seq_length), generator=g)
    torch.manual_seed(123)  # same dropout draws in both runs
    loss = lm_loss(model(tokens), (labels, torch.ones_like(labels)))
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("group", [1, 3])
def test_activation_checkpointing_gives_identical_gradients_with_dropout(tiny_raw, group):
    raw = tiny_raw(vocab_size=512, hidden_dropout=0.2,
                   attention_config=[[["baseconv", "attention", "hyena", "rwkv4"], "all"]])
    (plain,) = run_ranks(_grads_with_dropout, 1, raw, 0)
    (ckpt,) = run_ranks(_grads_with_dropout, 1, raw, group)
    assert ckpt[0] == plain[0]
    for name, g in plain[1].items():
        assert torch.equal(ckpt[1][name], g), name  # recomputation replays the same dropout masks


def test_activation_checkpointing_in_the_pipeline_trains_identically(tiny_raw):
    raw = tiny_raw(pipe_parallel_size=2, hidden_dropout=0.1, train_iters=3)
    plain = train(raw, 2)[0]
    ckpt = train({**raw, "checkpoint_activations": True, "checkpoint_num_layers": 1}, 2)[0]
    assert losses(ckpt) == pytest.approx(losses(plain), abs=1e-6)


# ----------------------------------------------------------------------------- sparse hybrids through the loop


def test_sparse_learned_hybrid_dp2_equals_dp1_with_accumulation_and_logs_its_stats(tiny_raw, tmp_path):
    raw = tiny_raw(attention_config=[[["baseconv", "sparse_learned"], "all"]],
                   sparse_learned={"budget": 0.125, "aux_loss_coef": 1.0, "noise_std": 0.0},  # noise draws depend on DP layout
                   log_dir=str(tmp_path / "logs"))
    dp1 = train({**raw, "gradient_accumulation_steps": 2}, 1)[0]
    dp2 = train({**raw, "gradient_accumulation_steps": 1}, 2)
    for s in dp2:
        assert losses(s) == pytest.approx(losses(dp1), abs=1e-5)
    stats = dp2[0]["layer_stats"]
    assert set(stats) >= {"sparse/layer2/aux_loss", "sparse/layer2/selected_fraction", "sparse/layer4/aux_loss"}
    assert 0.0 < stats["sparse/layer2/selected_fraction"] <= 1.0
    assert "layer stats: sparse/layer2/aux_loss=" in (tmp_path / "logs" / "train.log").read_text()


def test_peak_flops_by_device_name_and_mfu_arithmetic(monkeypatch):
    from neox_zoology.training import metrics

    assert metrics.peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12  # SXM
    assert metrics.peak_flops_for("NVIDIA H100 PCIe") == 756e12  # the longer key wins over "H100"
    assert metrics.peak_flops_for("NVIDIA H100 NVL") == 835e12
    assert metrics.peak_flops_for("NVIDIA A100-SXM4-80GB") == 312e12
    assert metrics.peak_flops_for("Some Future GPU") is None

    monkeypatch.setattr(metrics, "device_peak_flops", lambda: 100e12)
    tp = metrics.Throughput(tokens_per_step=1000, train_flops_per_token=2e9, world_size=4)
    clock = iter([10.0, 12.0])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    tp.reset()
    tp.tick()
    tp.tick()
    m = tp.read()  # 2 steps x 1000 tokens in 2 s, 2 GFLOP each, over 4 ranks
    assert m["tokens_per_s"] == 1000 and m["s_per_step"] == 1.0
    assert m["tflops_per_rank"] == pytest.approx(0.5) and m["mfu"] == pytest.approx(0.5e12 / 100e12)

"""GPT-NeoX keys that change the model or the numbers: each one as GPT-NeoX defines it."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from dist import assert_tp2_equals_tp1, init_tp, run_ranks
from neox_zoology import build_mixer
from neox_zoology.config import ConfigError, build_args
from neox_zoology.model.block import activation_function
from neox_zoology.training import dryrun

BASE = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16, "vocab_size": 100,
        "attention_config": [[["attention"], "all"]], "pos_emb": "rotary"}


def test_grouped_query_attention_equals_plain_reference():
    torch.manual_seed(0)
    m = build_mixer("attention", hidden_size=32, seq_length=16, num_attention_heads=4, num_kv_heads=2,
                    pos_emb="none")
    params = dict(m.named_parameters())
    wq = next(v for k, v in params.items() if k.endswith("q.weight"))
    wkv = next(v for k, v in params.items() if k.endswith("kv.weight"))
    x = torch.randn(2, 16, 32)
    q = F.linear(x, wq).view(2, 16, 4, 8)
    kv = F.linear(x, wkv).view(2, 16, 2, 2, 8)  # per kv head [k|v]
    q_b = next(v for k, v in params.items() if k.endswith("q.bias"))
    kv_b = next(v for k, v in params.items() if k.endswith("kv.bias"))
    q = q + q_b.view(4, 8)
    kv = kv + kv_b.view(2, 2, 8)
    out = torch.empty(2, 16, 4, 8)
    causal = torch.ones(16, 16).tril().bool()
    for head in range(4):
        g = head // 2  # query head i reads kv head i // (heads / kv heads)
        k, v = kv[:, :, g, 0], kv[:, :, g, 1]
        scores = q[:, :, head] @ k.transpose(1, 2) / math.sqrt(8)
        out[:, :, head] = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
    wo = next(v for k, v in params.items() if k.endswith("out.weight"))
    bo = next(v for k, v in params.items() if k.endswith("out.bias"))
    expected = F.linear(out.reshape(2, 16, 32), wo, bo)
    torch.testing.assert_close(m(x), expected, atol=1e-5, rtol=1e-5)


def test_grouped_query_parameter_count():
    full = dryrun.summarize(build_args(BASE, world_size=1))["parameters"]
    gqa = dryrun.summarize(build_args({**BASE, "num_kv_heads": 1}, world_size=1))["parameters"]
    # k and v shrink from 4 heads to 1: 2 x 3 heads x 8 channels, weights and biases, per layer
    assert full - gqa == 2 * (2 * 3 * 8 * 32 + 2 * 3 * 8)


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["kv-split", "kv-replicated"])
def test_grouped_query_tp2_equals_tp1(tiny_raw, kv_heads):
    raw = tiny_raw(attention_config=[[["attention"], "all"]], num_kv_heads=kv_heads, vocab_size=512)
    assert_tp2_equals_tp1(raw)


def test_groupedquery_attention_type_needs_num_kv_heads():
    with pytest.raises(ConfigError, match="attention_type: groupedquery needs num_kv_heads"):
        build_args({**BASE, "attention_type": "groupedquery"}, world_size=1)
    args = build_args({**BASE, "attention_type": "groupedquery", "num_kv_heads": 2}, world_size=1)
    assert args.mixer_args("attention")["num_kv_heads"] == 2


def test_kv_heads_must_split_or_replicate_over_tp():
    with pytest.raises(ConfigError, match="num_kv_heads 3 and model_parallel_size 2: the kv heads split"):
        build_args({**BASE, "hidden_size": 48, "num_attention_heads": 12, "num_kv_heads": 3,
                    "model_parallel_size": 2}, world_size=2)
    build_args({**BASE, "hidden_size": 64, "num_attention_heads": 8, "num_kv_heads": 2, "model_parallel_size": 4},
               world_size=4)  # 2 kv heads replicated over 4 ranks


def test_neox_swiglu_width_rule():
    llama = build_args({**BASE, "hidden_size": 4096, "num_attention_heads": 32, "activation": "swiglu",
                        "intermediate_size": 32768, "mlp_multiple_of": 256}, world_size=1)
    assert llama.mlp_widths == (22016, 11008) and llama.mlp_width == 11008
    plain = build_args({**BASE, "intermediate_size": 96}, world_size=1)
    assert plain.mlp_width == 96


def test_inconsistent_neox_mlp_sizes_are_refused():
    with pytest.raises(ConfigError, match=r"first projection of 9558 and a second of 4778"):
        build_args({**BASE, "activation": "swiglu", "intermediate_size": 14336}, world_size=1)


def test_bias_gelu_fusion_is_the_tanh_gelu():
    x = torch.linspace(-6, 6, 1001)
    tanh_gelu, gated = activation_function("gelu", tanh_gelu=True)
    formula = 0.5 * x * (1 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))
    torch.testing.assert_close(tanh_gelu(x), formula, atol=1e-6, rtol=1e-6)
    assert not gated and (tanh_gelu(x) - F.gelu(x)).abs().max() > 1e-4
    args = build_args({**BASE, "bias_gelu_fusion": True}, world_size=1)
    from neox_zoology.model.block import ZooBlock
    from neox_zoology.training.engine import model_config

    block = ZooBlock(args, model_config(args), 1, "attention", 0)
    torch.testing.assert_close(block.mlp.act(x), formula, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("key,per_layer,final", [
    ("use_bias_in_mlp", 4 * 32 + 32, 0),          # up and down biases
    ("use_bias_in_attn_linear", 3 * 32 + 32, 0),  # qkv and output biases
    ("use_bias_in_norms", 2 * 32, 32),             # two LayerNorm biases per block, one in the final norm
])
def test_bias_switches_remove_exactly_their_biases(key, per_layer, final):
    raw = {**BASE, "norm": "layernorm"}
    on = dryrun.summarize(build_args(raw, world_size=1))["parameters"]
    off = dryrun.summarize(build_args({**raw, key: False}, world_size=1))["parameters"]
    assert on - off == 2 * per_layer + final


def test_sliding_window_width_is_flash_attention_window():
    args = build_args({**BASE, "sliding_window_width": 4}, world_size=1)
    from neox_zoology.mixers.attention import effective_window

    assert effective_window(args.mixer_args("attention")) == 5  # the current position and the 4 before it
    m = build_mixer("attention", hidden_size=32, seq_length=16, num_attention_heads=4, window=5)
    x = torch.randn(1, 16, 32, requires_grad=True)
    m(x)[0, 10].sum().backward()
    seen = (x.grad[0].abs().sum(-1) > 0).nonzero().flatten().tolist()
    assert seen == [6, 7, 8, 9, 10]


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        build_args({**BASE, "moe_num_experts": 8, "warmup_iters": 5, "use_bnb_optimizer": True,
                    "hidden_size": "big"}, world_size=1)
    lines = str(err.value).splitlines()
    assert len(lines) == 4
    assert any("moe_num_experts" in ln for ln in lines) and any("warmup_iters" in ln for ln in lines)


def test_hints_only_when_close():
    with pytest.raises(ConfigError) as err:
        build_args({**BASE, "moe_something_else": 1}, world_size=1)
    assert "did you mean" not in str(err.value) and "docs/config-keys.md" in str(err.value)
    with pytest.raises(ConfigError, match="did you mean num_attention_heads"):
        build_args({**BASE, "num_atention_heads": 4}, world_size=1)


def test_neox_rwkv_and_block_sparse_local_are_refused():
    with pytest.raises(ConfigError, match="RWKV-v6"):
        build_args({**BASE, "attention_config": [[["rwkv"], "all"]]}, world_size=1)
    with pytest.raises(ConfigError, match="block-sparse local attention"):
        build_args({**BASE, "attention_config": [[["local"], "all"]]}, world_size=1)
    assert build_args({**BASE, "attention_config": [[["rwkv4"], "all"]]}, world_size=1).layer_types == ["rwkv"] * 2


def test_fp16_marker_bfloat16_means_bf16():
    args = build_args({**BASE, "fp16": {"enabled": True, "type": "bfloat16", "loss_scale": 0}}, world_size=1)
    assert args.dtype_name == "bf16"


def _step_grad_norm(rank, raw, world):
    from neox_zoology.model.gpt import lm_loss
    from neox_zoology.parallel import setup as psetup
    from neox_zoology.parallel.cpu_compat import model_parallel_seed
    from neox_zoology.tokenizer import resolve_vocab
    from neox_zoology.training.engine import build_engine

    psetup.init_distributed("gloo")
    topo = psetup.init_model_parallel(raw.get("model_parallel_size", 1), 1)
    model_parallel_seed(3)
    args = build_args(raw, world_size=world)
    resolve_vocab(args)
    engine = build_engine(args, topo)
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, args.vocab_size, (2, args.seq_length + 1), generator=g)
    loss = lm_loss(engine(tokens[:, :-1]), (tokens[:, 1:], torch.ones(2, args.seq_length)))
    engine.backward(loss)
    engine.step()
    return engine.get_global_grad_norm()


@pytest.mark.parametrize("tp", [1, 2])
def test_grad_norm_logged_under_zero_stage_0_equals_stage_1(tiny_raw, tp):
    raw = tiny_raw(vocab_size=128, gradient_clipping=0.05, model_parallel_size=tp)
    norms = {}
    for stage in (0, 1):
        raw["zero_optimization"] = {"stage": stage}
        norms[stage] = [float(n) for n in run_ranks(_step_grad_norm, tp, raw, tp)]
    assert all(math.isfinite(n) and n > 0.05 for n in norms[0])
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)


def _reduce_dtypes(rank):
    from neox_zoology.parallel import reduce_from_tp
    from neox_zoology.parallel.tp import set_fp32_allreduce

    init_tp(2)
    seen = []
    real = torch.distributed.all_reduce

    def spy(t, *a, **k):
        seen.append(str(t.dtype))
        return real(t, *a, **k)

    torch.distributed.all_reduce = spy
    x = torch.full((4,), 1.0 + rank, dtype=torch.bfloat16)
    set_fp32_allreduce(True)
    on = reduce_from_tp(x)
    set_fp32_allreduce(False)
    off = reduce_from_tp(x.clone())
    return seen, str(on.dtype), on.float().tolist(), off.float().tolist()


def test_fp32_allreduce_reduces_bf16_in_fp32():
    for seen, dtype, on, off in run_ranks(_reduce_dtypes, 2):
        assert seen == ["torch.float32", "torch.bfloat16"] and dtype == "torch.bfloat16"
        assert on == off == [3.0] * 4


def test_tokenizer_of_another_kind_is_one_line(tmp_path):
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps({"a": 0, "b": 1}))
    merges = tmp_path / "merges.txt"
    merges.write_text("#version: 0.2\n")
    from neox_zoology.tokenizer import load_tokenizer

    hf = tmp_path / "tokenizer.json"
    hf.write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
                              "added_tokens": []}))
    for tokenizer_type, files in (("HFTokenizer", {"vocab_file": str(vocab)}),
                                  ("GPT2BPETokenizer", {"vocab_file": str(hf), "merge_file": str(merges)})):
        args = build_args({**BASE, "tokenizer_type": tokenizer_type, **files}, world_size=1)
        with pytest.raises(ConfigError) as err:
            load_tokenizer(args)
        line = str(err.value)
        assert "\n" not in line and tokenizer_type in line and files["vocab_file"] in line

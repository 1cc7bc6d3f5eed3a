"""Every GPT-NeoX config of tests/data/neox-configs either plans the model GPT-NeoX builds (parameter count by
GPT-NeoX's own sizing rules, written out below) or is refused with exit code 2 and one `config error:` line per
problem, never a traceback.

The tokenizer files these configs name live on EleutherAI's machines, so each planned config is given its
tokenizer's vocabulary size (`--set vocab_size=N vocab_file=null`), as GPT-NeoX would read it from the file.
"""
from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import pytest
import yaml

from neox_zoology.config import load, normalize_key
from neox_zoology.training import cli, dryrun

DATA = Path(__file__).parent / "data" / "neox-configs"

PYTHIA_VOCAB = 50277  # GPT-NeoX-20B tokenizer (HFTokenizer 20B_tokenizer.json)
GPT2_VOCAB = 50257
LLAMA_VOCAB = 32000
CODELLAMA_VOCAB = 32016

PLANNED = {
    # config: vocabulary size of its tokenizer
    **{f"pythia/{n}.yml": PYTHIA_VOCAB for n in ("14M", "31M", "70M", "160M", "410M", "1B", "1-4B", "2-8B",
                                                 "6-9B", "12B")},
    "20B.yml": PYTHIA_VOCAB,
    **{n: GPT2_VOCAB for n in ("1-3B.yml", "125M.yml", "125M-json.yml", "13B.yml", "175B.yml", "2-7B.yml",
                               "350M.yml", "49M.yml", "6-7B.yml", "760M.yml", "800M.yml", "bf16_125M.yml",
                               "slurm_125M.yml")},
    **{f"llama/{n}.yml": LLAMA_VOCAB for n in ("7B", "13B", "30B", "65B")},
    **{f"llama2/{n}.yml": LLAMA_VOCAB for n in ("7B", "13B", "70B")},
    "llama2/codellama_7B.yml": CODELLAMA_VOCAB,
    "llama2/codellama_34B.yml": CODELLAMA_VOCAB,
    "llemma/34B.yml": CODELLAMA_VOCAB,
    "19M.yml": GPT2_VOCAB,
    # no tokenizer keys: GPT-NeoX's default GPT2BPETokenizer
    **{f"mamba/mamba-{n}.yml": GPT2_VOCAB for n in ("130M", "370M", "790M", "1.4B", "2.8B")},
}

NO_MODEL = r"no model keys \(num_layers, hidden_size, num_attention_heads\)"
REFUSED = {
    # config: what its refusal line says
    "1-3B-transformer-engine.yml": r"te_\w+: .*Transformer Engine layers are not implemented here",
    "125M-dmoe.yml": r"moe_num_experts: 8; mixture-of-experts layers are not implemented here",
    "bnb_125M.yml": r"use_bnb_optimizer: true; bitsandbytes' 8-bit Adam is not implemented here",
    "gmlp_small.yml": r"layer type 'gmlp': gMLP blocks are not implemented here",
    "rwkv/170M.yml": r"layer type 'rwkv': GPT-NeoX's rwkv is RWKV-v6, .* write rwkv4",
    "mistral/7B.yml": r"intermediate_size 14336 with activation swiglu and mlp_multiple_of 1: GPT-NeoX's MLP rule "
                      r"gives a first projection of 9558 and a second of 4778 inputs.*43008",
    "llemma/7B.yml": r"unknown key 'warmup_iters'",
    "finetuning_configs/6-9B.yml": r"load: /path/to/checkpoint",
    **{n: NO_MODEL for n in ("cpu_mock_config.yml", "docker/pythia-paths.yml", "eleutherai_cluster.yml",
                             "llama/train_config.yml", "local_setup.yml", "local_setup_comet.yml",
                             "local_setup_wandb.yml", "prof.yml", "slurm_local.yml", "sparse.yml",
                             "text_generation.yml")},
}

GATED = ("geglu", "reglu", "swiglu", "bilinear", "glu")


def neox_layer_types(c: dict) -> list[str]:
    """GPT-NeoX's expansion of attention_config: [[types], n] repeats the list of types n times."""
    out = []
    for types, n in c.get("attention_config") or [[["global"], c["num_layers"]]]:
        out += list(types) * n
    return out


def neox_mamba_layer(c: dict, h: int) -> int:
    """GPT-NeoX's ParallelMambaResidualLayer: one norm and the Mamba block, no MLP. d_state 16, d_conv 4,
    d_inner = intermediate_size or expansion_factor (2) x h, dt_rank ceil(h / 16); mamba_use_bias_in_linears
    puts biases on in_proj, x_proj and out_proj, mamba_use_bias_in_conv (default true) on the conv."""
    N, K, R = 16, 4, math.ceil(h / 16)
    E = c.get("intermediate_size") or int((c.get("expansion_factor") or 2) * h)
    lin_bias, conv_bias = c.get("mamba_use_bias_in_linears", False), c.get("mamba_use_bias_in_conv", True)
    in_proj = h * 2 * E + (2 * E if lin_bias else 0)
    conv = E * K + (E if conv_bias else 0)
    x_proj = E * (R + 2 * N) + (R + 2 * N if lin_bias else 0)
    dt_proj = R * E + E
    a_log, d_skip = E * N, E
    out_proj = E * h + (h if lin_bias else 0)
    return in_proj + conv + x_proj + dt_proj + a_log + d_skip + out_proj


def neox_parameters(cfg: dict, vocab: int) -> int:
    """GPT-NeoX's parameter count of a config (its sizing rules, TP = 1 view of the whole model)."""
    c = {normalize_key(k): v for k, v in cfg.items()}
    h, layers, heads = c["hidden_size"], c["num_layers"], c["num_attention_heads"]
    kv_heads = c.get("num_kv_heads") or heads
    tp = c.get("model_parallel_size", 1)
    multiple = c.get("make_vocab_size_divisible_by", 128) * tp
    padded = math.ceil(vocab / multiple) * multiple
    embedding = padded * h
    if c.get("pos_emb", "learned") == "learned":
        embedding += c.get("max_position_embeddings", c["seq_length"]) * h
    attn_bias = c.get("use_bias_in_attn_linear", True)
    qkv_out = h + 2 * kv_heads * (h // heads)
    attention = h * qkv_out + h * h + (qkv_out + h if attn_bias else 0)
    # MLP: linear1 is ffn wide, linear2 takes ffn_in; a gated activation takes 2/3 of the size and halves it
    ffn = c.get("intermediate_size") or 4 * h
    m = c.get("mlp_multiple_of", 1)
    ffn_in = ffn
    if c.get("activation", "gelu") in GATED:
        ffn = int(ffn * 2 / 3)
        ffn_in = ffn // 2
    ffn = 2 * m * math.ceil(ffn / (2 * m))
    ffn_in = m * math.ceil(ffn_in / m)
    mlp_bias = c.get("use_bias_in_mlp", True)
    mlp = h * ffn + ffn_in * h + (ffn + h if mlp_bias else 0)
    layernorm = c.get("norm", "layernorm") == "layernorm"
    norm = h * (2 if layernorm and c.get("use_bias_in_norms", True) else 1)
    head = padded * h if c.get("no_weight_tying", False) else 0
    types = neox_layer_types(c)
    assert len(types) == layers
    mamba = types.count("mamba")
    blocks = (layers - mamba) * (attention + mlp + 2 * norm) + mamba * (neox_mamba_layer(c, h) + norm)
    return embedding + blocks + norm + head


def all_configs() -> list[str]:
    return sorted(str(p.relative_to(DATA)) for p in DATA.rglob("*.yml"))


def test_every_config_has_an_expected_outcome():
    assert sorted(PLANNED.keys() | REFUSED.keys()) == all_configs()
    assert not PLANNED.keys() & REFUSED.keys()


def plan_sets(vocab: int) -> list[str]:
    return [f"vocab_size={vocab}", "vocab_file=null", "merge_file=null"]


def plan(name: str, extra=()):
    """The config loaded as `--dry-run` loads it (one data-parallel replica: TP x pipeline stages ranks)."""
    raw = {normalize_key(k): v for k, v in yaml.safe_load((DATA / name).read_text()).items()}
    world = raw.get("model_parallel_size", 1) * max(1, raw.get("pipe_parallel_size", 0))
    return load([str(DATA / name)], sets=plan_sets(PLANNED.get(name, LLAMA_VOCAB)) + list(extra), world_size=world)


@pytest.mark.parametrize("name", sorted(PLANNED), ids=str)
def test_config_plans_neox_parameter_count(name):
    path = DATA / name
    planned = dryrun.summarize(plan(name))["parameters"]
    assert planned == neox_parameters(yaml.safe_load(path.read_text()), PLANNED[name])


def mlp_biases(name: str) -> int:
    """Biases of the MLPs GPT-NeoX adds where a llama-style config leaves use_bias_in_mlp at its default."""
    args = plan(name)
    return args.num_layers * (2 * args.mlp_width + args.hidden_size)


@pytest.mark.parametrize("name,count", [
    ("llama/7B.yml", 6_738_415_616), ("llama2/7B.yml", 6_738_415_616), ("llama2/70B.yml", 68_976_648_192),
    ("pythia/70M.yml", 70_426_624), ("pythia/160M.yml", 162_322_944), ("pythia/12B.yml", 11_846_072_320),
])
def test_published_sizes(name, count):
    """Published parameter counts (LLaMA, Llama-2 and Pythia checkpoints). GPT-NeoX's llama2 configs do not set
    use_bias_in_mlp: false, so the model they build has MLP biases on top."""
    args = plan(name)
    extra = mlp_biases(name) if name.startswith("llama2/") else 0
    assert args.use_bias_in_mlp == name.startswith(("llama2/", "pythia/"))
    assert dryrun.summarize(args)["parameters"] == count + extra


def test_mistral_with_neox_sizing_of_its_width_plans_mistral_7b():
    """Mistral-7B's 14336-wide projections in GPT-NeoX's terms: intermediate_size 3 x 14336 (plus the MLP biases
    the config leaves on)."""
    args = plan("mistral/7B.yml", ["intermediate_size=43008"])
    assert args.mlp_width == 14336 and args.kv_heads == 8 and args.mixer_args("attention")["sliding_window_width"] == 4096
    biases = args.num_layers * (2 * args.mlp_width + args.hidden_size)
    assert dryrun.summarize(args)["parameters"] == 7_241_732_096 + biases


def run_cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("name", sorted(REFUSED), ids=str)
def test_config_is_refused_in_lines(name):
    sets = sum((["--set", s] for s in plan_sets(PYTHIA_VOCAB)), [])
    rc, out, err = run_cli([str(DATA / name), "--dry-run", *sets])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and lines, err
    assert all(ln.startswith("config error: ") for ln in lines), err
    assert any(__import__("re").search(REFUSED[name], ln) for ln in lines), err
    assert "Traceback" not in out + err


def test_fp16_config_plans_through_the_cli():
    rc, out, err = run_cli([str(DATA / "pythia/70M.yml"), "--dry-run", *sum((["--set", s] for s in
                            plan_sets(PYTHIA_VOCAB)), [])])
    assert rc == 0, err
    assert "parameters: 70,426,624" in out


def test_llemma_lists_every_problem_at_once():
    rc, _, err = run_cli([str(DATA / "llemma/7B.yml"), "--dry-run"])
    lines = err.splitlines()
    assert rc == 2
    assert any("'warmup_iters'" in ln for ln in lines) and any("'decay_lr_to'" in ln for ln in lines)


def test_mamba_130m_without_position_embeddings_is_the_published_mamba_130m():
    """state-spaces/mamba-130m: 129,135,360 parameters (vocabulary 50280 padded to a multiple of 8, no position
    embeddings, tied head). GPT-NeoX's config adds learned position embeddings (its pos_emb default)."""
    args = load([str(DATA / "mamba/mamba-130M.yml")], sets=["vocab_size=50280", "vocab_file=null", "merge_file=null",
                                                            "make_vocab_size_divisible_by=8", "pos_emb=none"])
    assert args.ignored_keys.count("mamba_selective_scan_fusion") == 1
    assert dryrun.summarize(args)["parameters"] == 129_135_360


@pytest.mark.parametrize("sets,expected", [([], "init_method"), (["mamba={projection_init: kaiming_uniform}"],
                                                                 "kaiming_uniform")])
def test_gpt_neox_mamba_configs_init_their_projections_as_gpt_neox(sets, expected):
    """GPT-NeoX's Mamba builds in_proj / x_proj / out_proj with init_method / output_layer_init_method; a config
    carrying its mamba_* keys gets that, unless its mamba section names a projection_init."""
    args = plan("mamba/mamba-130M.yml", sets)
    assert args.mixer_args("mamba")["projection_init"] == expected


def test_our_mamba_configs_keep_the_reference_init():
    ours = Path(__file__).parents[1] / "configs" / "neox" / "mamba_360m.yml"
    args = load([str(ours)], sets=["vocab_file=null", "merge_file=null", "vocab_size=50304"])
    assert args.mixer_args("mamba")["projection_init"] == "kaiming_uniform"


@pytest.mark.parametrize("sets", [["mamba_use_bias_in_linears=true"], ["mamba_use_bias_in_conv=false"],
                                  ["mamba_use_bias_in_linears=true", "mamba_use_bias_in_conv=false"]])
def test_mamba_bias_switches_plan_neox_count(sets):
    name = "mamba/mamba-130M.yml"
    args = plan(name, sets)
    raw = yaml.safe_load((DATA / name).read_text())
    raw.update({k: v == "true" for k, v in (s.split("=") for s in sets)})
    section = args.mixer_args("mamba")
    assert section["bias"] == section["x_proj_bias"] == raw.get("mamba_use_bias_in_linears", False)
    assert section["conv_bias"] == raw.get("mamba_use_bias_in_conv", True)
    assert dryrun.summarize(args)["parameters"] == neox_parameters(raw, PLANNED[name])


@pytest.mark.parametrize("sets,pattern", [
    (["mamba_selective_fp32_params=true"], r"mamba_selective_fp32_params: true; keeping A_log and D in fp32"),
    (["mamba_use_bias_in_conv=false", "mamba={conv_bias: true}"],
     r"mamba_use_bias_in_conv: false contradicts mamba.conv_bias: true; keep one"),
    (["mamba_inner_func_fusion=3"], r"mamba_inner_func_fusion: 3; use true or false"),
])
def test_mamba_switch_problems_are_one_line_each(sets, pattern):
    rc, out, err = run_cli([str(DATA / "mamba/mamba-130M.yml"), "--dry-run",
                            *sum((["--set", s] for s in plan_sets(GPT2_VOCAB) + sets), [])])
    assert rc == 2 and "Traceback" not in out + err
    assert any(__import__("re").search(pattern, ln) for ln in err.splitlines()), err


def test_mamba_fp32_params_in_an_fp32_run_changes_nothing():
    args = plan("mamba/mamba-130M.yml", ["mamba_selective_fp32_params=true", "fp16={enabled: false}"])
    assert "mamba_selective_fp32_params" in args.ignored_keys

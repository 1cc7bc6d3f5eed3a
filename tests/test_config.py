"""Config loading, merging, expansion and every validation error (no process groups here)."""
import json
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, SHARED
from neox_zoology.config import ConfigError, build_args, check_paths, expand_attention_config, load, merge_files

BASE = {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32, "vocab_size": 100}


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if isinstance(data, dict) else data)
    return str(p)


def test_merge_files_and_dash_keys(tmp_path):
    a = write(tmp_path, "a.yml", {"num-layers": 4, "hidden_size": 64})
    b = write(tmp_path, "b.yml", {"num_attention_heads": 4, "seq-length": 32, "vocab_size": 100})
    args = load([a, b], world_size=1)
    assert (args.num_layers, args.hidden_size, args.num_attention_heads, args.seq_length) == (4, 64, 4, 32)
    assert args.sources["num_layers"] == a and args.sources["seq_length"] == b


def test_key_set_in_two_files_names_both(tmp_path):
    a = write(tmp_path, "a.yml", {"hidden_size": 64})
    b = write(tmp_path, "b.yml", {"hidden-size": 128})
    with pytest.raises(ConfigError, match=r"'hidden_size' is set in both .*a\.yml and .*b\.yml"):
        merge_files([a, b])


def test_a_later_file_replaces_the_data_and_tokenizer_groups_whole(tmp_path):
    model = write(tmp_path, "model.yml", {**BASE, "train_data_paths": ["pile/train"], "valid_data_paths": ["pile/val"],
                                          "tokenizer_type": "GPT2BPETokenizer", "vocab_file": "gpt2.json",
                                          "merge_file": "gpt2.txt", "save": "ckpt/a", "load": "ckpt/a",
                                          "ar_eval": {"enabled": True, "bigram_counts": "pile.npz"}})
    data = write(tmp_path, "data.yml", {"data_path": "mine/text", "tokenizer_type": "HFTokenizer",
                                        "vocab_file": "20B.json", "save": "ckpt/b"})
    raw, source = merge_files([model, data])
    assert raw["data_path"] == "mine/text" and "train_data_paths" not in raw and "valid_data_paths" not in raw
    assert "ar_eval" not in raw  # bigram counts of the replaced data go with it
    assert raw["vocab_file"] == "20B.json" and "merge_file" not in raw
    assert raw["save"] == "ckpt/b" and raw["load"] == "ckpt/a"  # where the run writes: key by key
    notes = " | ".join(source.notes)
    assert "replaces the data keys of" in notes and "train_data_paths, valid_data_paths" in notes
    assert "replaces the tokenizer keys" in notes and "save of" in notes
    args = build_args(raw, source, world_size=1)
    assert args.config_notes == source.notes and args.data_path == "mine/text"
    # an override file replaces a group too; --set replaces one key only
    raw, _ = merge_files([model], overrides=[write(tmp_path, "o.yml", {"data_path": "x"})],
                         sets=["valid_data_paths=[v]"])
    assert raw["data_path"] == "x" and raw["valid_data_paths"] == ["v"] and "train_data_paths" not in raw
    # any other key in two files is still an error
    with pytest.raises(ConfigError, match=r"'hidden_size' is set in both"):
        merge_files([model, write(tmp_path, "d2.yml", {"data_path": "y", "hidden_size": 32})])


def test_override_file_and_set_replace_keys(tmp_path):
    a = write(tmp_path, "a.yml", BASE)
    o = write(tmp_path, "o.yml", {"hidden_size": 128})
    args = load([a], overrides=[o], sets=["num_layers=2", "attention_config=[[[baseconv], all]]"], world_size=1)
    assert args.hidden_size == 128 and args.num_layers == 2 and args.layer_types == ["baseconv"] * 2


def test_attention_config_expansion():
    assert expand_attention_config([[["baseconv", "attention"], 4]], 4) == ["baseconv", "attention"] * 2
    assert expand_attention_config([[["global"], "all"]], 3) == ["global"] * 3
    assert expand_attention_config([[["a"], 1], [["b", "c"], 3]], 4) == ["a", "b", "c", "b"]
    with pytest.raises(ConfigError, match="expands to 3 layers but num_layers is 4"):
        expand_attention_config([[["a"], 3]], 4)
    with pytest.raises(ConfigError, match="count"):
        expand_attention_config([[["a"], -1]], 4)


def test_neox_aliases_map_to_registered_types():
    args = build_args({**BASE, "attention_config": [[["global", "flash", "rwkv4", "baseconv"], "all"]]}, world_size=1)
    assert args.layer_types == ["attention", "attention", "rwkv", "baseconv"]


def test_mixer_sections_and_defaults():
    args = build_args({**BASE, "attention_config": [[["baseconv"], "all"]], "baseconv": {"kernel_sizes": [3, -1]}},
                      world_size=1)
    occ = args.layer_occurrences()
    assert occ == [(0, "baseconv"), (1, "baseconv"), (2, "baseconv"), (3, "baseconv")]
    assert args.mixer_args("baseconv")["kernel_sizes"] == [3, -1]


@pytest.mark.parametrize(
    "raw,pattern",
    [
        ({"hiden_size": 64}, r"unknown key 'hiden_size'; did you mean hidden_size"),
        ({"attention_config": [[["hyenna"], "all"]]}, r"unknown layer type 'hyenna'.*Registered layer types: .*baseconv"),
        ({"hidden_size": 66}, r"hidden_size 66 is not divisible by num_attention_heads 4"),
        ({"model_parallel_size": 3}, r"not divisible by model_parallel_size 3"),
        ({"num_attention_heads": 2, "model_parallel_size": 4, "hidden_size": 64},
         r"num_attention_heads 2 is not divisible by model_parallel_size 4"),
        ({"pipe_parallel_size": 8}, r"8 pipeline stages for 4 layers"),
        ({"norm": "rmsnrom"}, r"norm: 'rmsnrom' is not supported \(did you mean rmsnorm\?\)"),
        ({"baseconv": {"kernel_size": 3}}, r"baseconv: unknown argument\(s\) kernel_size; valid: .*kernel_sizes"),
        ({"attention_config": [[["baseconv"], "all"]], "baseconv": {"kernel_sizes": [0]}}, r"kernel_sizes: 0"),
        ({"attention_config": [[["sliding_window"], "all"]], "sliding_window": {"window": 0}}, r"window: 0"),
        ({"hidden_size": "big"}, r"hidden_size: 'big'; use a positive integer"),
        ({"warmup": 5}, r"warmup: 5"),
        ({"zero_optimization": {"stage": 3}}, r"zero_optimization.stage: 3"),
        ({"train_batch_size": 7, "train_micro_batch_size_per_gpu": 2}, r"train_batch_size 7 is not a multiple"),
    ],
)
def test_validation_errors(raw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_args({**BASE, **raw}, world_size=1)


def test_world_size_must_fit_parallel_sizes():
    with pytest.raises(ConfigError, match="3 ranks do not divide into model_parallel_size 2"):
        build_args({**BASE, "model_parallel_size": 2}, world_size=3)


def test_train_batch_size_derives_accumulation():
    args = build_args({**BASE, "train_batch_size": 16, "train_micro_batch_size_per_gpu": 2}, world_size=2)
    assert args.dp == 2 and args.gradient_accumulation_steps == 4 and args.global_batch == 16


def test_missing_data_and_tokenizer_paths(tmp_path):
    args = build_args({**BASE, "data_path": str(tmp_path / "nope")}, world_size=1)
    with pytest.raises(ConfigError, match=r"data_path: .*nope\.bin not found; preprocess it there \(python -m "
                       r"tokenization\.preprocess .*--output-prefix .*nope .*\), or train on other data"):
        check_paths(args)
    no_size = {k: v for k, v in BASE.items() if k != "vocab_size"}
    args = build_args({**no_size, "vocab_file": str(tmp_path / "v.json")}, world_size=1)
    with pytest.raises(ConfigError, match=r"vocab_file: file .*v\.json not found"):
        check_paths(args, need_data=False)
    # a dry run with vocab_size plans without the file, and says so; a launch needs it
    args = build_args({**BASE, "vocab_file": str(tmp_path / "v.json")}, world_size=1)
    check_paths(args, need_data=False)
    assert any("v.json not found; the plan uses vocab_size 100" in n for n in args.config_notes)
    with pytest.raises(ConfigError, match=r"vocab_file: file .*v\.json not found"):
        check_paths(build_args({**BASE, "vocab_file": str(tmp_path / "v.json")}, world_size=1))
    with pytest.raises(ConfigError, match="no training data"):
        check_paths(build_args(BASE, world_size=1))


NEOX = sorted((SHARED / "neox-configs").glob("*.yml")) if (SHARED / "neox-configs").exists() else []


@pytest.mark.skipif(not NEOX, reason="../shared/neox-configs is not beside the repository")
@pytest.mark.parametrize("path", [p for p in NEOX if p.name != "local_setup.yml"], ids=lambda p: p.name)
def test_real_neox_configs_load_with_our_override(path):
    override = ROOT / "configs" / "neox" / "neox_cpu_override.yml"
    args = load([str(path), str(SHARED / "neox-configs" / "local_setup.yml")], overrides=[str(override)], world_size=1)
    raw = yaml.safe_load(path.read_text())
    assert args.num_layers == raw["num_layers"] and args.hidden_size == raw["hidden_size"]
    assert set(args.layer_types) == {"attention"}
    assert "scaled_upper_triang_masked_softmax_fusion" in args.ignored_keys or "partition_activations" in args.ignored_keys


def run_cli(*argv, cwd=ROOT):
    return subprocess.run([sys.executable, "train.py", *argv], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_bad_config_is_one_line_and_nonzero(tmp_path):
    bad = write(tmp_path, "bad.yml", {**BASE, "num_atention_heads": 4})
    r = run_cli(bad, "--dry-run")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1
    assert lines[0].startswith(f"config error: {bad}: unknown key 'num_atention_heads'; did you mean num_attention_heads")
    assert "Traceback" not in r.stdout + r.stderr


def test_dry_run_counts_match_hand_formula(tmp_path):
    d, L, layers, V, ffn = 64, 32, 4, 100, 192
    cfg = write(tmp_path, "m.yml", {
        **BASE, "attention_config": [[["attention", "baseconv"], "all"]], "norm": "layernorm",
        "activation": "gelu", "intermediate_size": ffn, "pos_emb": "rotary", "baseconv": {"kernel_sizes": [3]},
    })
    r = run_cli(cfg, "--dry-run")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    padded = 128  # 100 padded to a multiple of 128
    norms = 2 * (2 * d)  # two LayerNorms (weight + bias) per block
    mlp = d * ffn + ffn + ffn * d + d
    attention = (3 * d * d + 3 * d) + (d * d + d) + norms + mlp
    baseconv = (d * d + d) + (3 * d + d) + norms + mlp  # W, b; depthwise kernel-3 filter + bias
    emb = padded * d + 2 * d  # tied embedding + final LayerNorm
    assert out["parameters_by_layer_type"] == {
        "attention": 2 * attention, "baseconv": 2 * baseconv, "embedding_and_head": emb,
    }
    assert out["parameters"] == 2 * attention + 2 * baseconv + emb
    fwd = 2 * (2 * (4 * d * d) + 4 * L * d) + 2 * (2 * d * d + 2 * 3 * d) + layers * 2 * (2 * d * ffn) + 2 * d * padded
    assert out["flops_per_token"] == pytest.approx(3 * fwd)


@pytest.mark.parametrize("name", ["attention_360m.yml", "baseconv_360m.yml"])
def test_paper_scale_configs_dry_run_within_10_percent(name):
    paper = {"attention_360m.yml": 360e6, "baseconv_360m.yml": 354e6}[name]
    r = run_cli(f"configs/neox/{name}", "--dry-run")
    assert r.returncode == 0, r.stderr
    n = json.loads(r.stdout.strip().splitlines()[-1])["parameters"]
    assert abs(n - paper) / paper < 0.10, n


def test_startup_notices_name_what_a_valid_config_does_differently():
    from neox_zoology.training.loop import startup_notices

    demo = ROOT / "configs" / "neox" / "demo_cpu.yml"
    base = ["vocab_file=null", "merge_file=null", "vocab_size=512"]
    h3 = 'attention_config=[[["h3"], "all"]]'
    assert not any("h3 under" in n for n in startup_notices(load([demo], sets=base + [h3])))  # fp32: nothing
    notes = startup_notices(load([demo], sets=base + [h3, "bf16={enabled: true}"]))
    assert any(n.startswith("h3 under bf16: DeepSpeed stores every parameter in bf16") for n in notes)
    # bf16 without H3 layers: no notice
    assert not any("h3 under" in n for n in startup_notices(load([demo], sets=base + ["bf16={enabled: true}"])))
    pipe = startup_notices(load([demo], sets=base + ["pipe_parallel_size=2", "checkpoint_activations=true",
                                                     "checkpoint_num_layers=2"], world_size=2))
    assert any(n.startswith("pipeline engine: activation checkpointing per block") for n in pipe)

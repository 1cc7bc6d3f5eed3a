"""Config fuzzing: mutated configs end in one clear ConfigError line (or are valid), never another exception.

The mutations: wrong types, unknown keys, out-of-range values, broken `attention_config` patterns,
inconsistent parallel sizes, broken mixer sections. What runs is exactly what `train.py` runs before
any process starts: `config.build_args` + `config.check_paths`.
"""
import copy
import subprocess
import sys

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT
from neox_zoology import registry
from neox_zoology.config import ConfigError, build_args, check_paths
from neox_zoology.training import dryrun

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)
KEYS = ["num_layers", "hidden_size", "num_attention_heads", "seq_length", "train_iters", "lr", "optimizer",
        "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "model_parallel_size",
        "pipe_parallel_size", "attention_config", "norm", "activation", "pos_emb", "split", "data_path",
        "zero_optimization", "bf16", "fp16", "precision", "seed", "warmup", "lr_decay_style", "lr_decay_iters",
        "weight_decay", "gradient_clipping", "tokenizer_type", "vocab_file", "eval_iters", "eval_interval",
        "log_interval", "checkpoint_factor", "keep_last_n_checkpoints", "max_nonfinite_steps", "baseconv",
        "hyena", "h3", "rwkv", "sliding_window", "long_conv", "make_vocab_size_divisible_by", "intermediate_size"]
LAYER_NAMES = st.sampled_from(registry.names(include_aliases=True) + ["", "atention", "BASECONV", "all"])
PATTERNS = st.one_of(
    VALUES,
    st.lists(st.tuples(st.lists(LAYER_NAMES, max_size=3), st.one_of(st.integers(-2, 6), st.just("all"), SCALARS)),
             max_size=3).map(lambda items: [list(i) for i in items]),
)


@st.composite
def mutations(draw):
    kind = draw(st.sampled_from(["type", "unknown", "range", "pattern", "parallel", "section"]))
    if kind == "type":
        return kind, draw(st.sampled_from(KEYS)), draw(VALUES)
    if kind == "unknown":
        return kind, draw(st.from_regex(r"[a-z][a-z_\-]{0,15}", fullmatch=True)), draw(VALUES)
    if kind == "range":
        return kind, draw(st.sampled_from(KEYS)), draw(st.one_of(st.integers(-5, 0), st.floats(-1e9, 0),
                                                                   st.integers(2**31, 2**62)))
    if kind == "pattern":
        return kind, "attention_config", draw(PATTERNS)
    if kind == "parallel":
        return kind, draw(st.sampled_from(["model_parallel_size", "pipe_parallel_size", "num_attention_heads",
                                           "num_layers", "hidden_size"])), draw(st.integers(-1, 9))
    section = draw(st.sampled_from(registry.names()))
    return kind, section, draw(st.dictionaries(
        st.sampled_from(list(registry.get(section).defaults) + ["bogus"]), VALUES, max_size=2))


def _valid_raw(tiny_raw):
    return tiny_raw(attention_config=[[["baseconv", "hyena", "attention", "rwkv"], "all"]])


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(muts=st.lists(mutations(), min_size=1, max_size=3), world=st.sampled_from([1, 2, 4]))
def test_mutated_configs_fail_with_one_clear_line_or_are_valid(tiny_raw, muts, world):
    raw = copy.deepcopy(_valid_raw(tiny_raw))
    for _, key, value in muts:
        raw[key] = value
    try:
        args = build_args(raw, {k: "fuzz.yml" for k in raw}, world_size=world)
        check_paths(args)
    except ConfigError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg and len(msg) < 2000, msg
        return
    # any other exception type propagates and fails the test with the mutated config in the report
    if args.num_layers * args.hidden_size <= 2**14 and args.seq_length <= 2**14:
        dryrun.summarize(args)  # a config that validates also builds (on the meta device)


@pytest.mark.parametrize("key,value,expect", [
    ("num_layers", "four", "num_layers"),
    ("attention_config", [[["baseconv"], 3]], "attention_config"),
    ("hyena", {"filter_order": -1}, "hyena.filter_order"),
])
def test_cli_prints_one_line_and_exits_2_without_starting(tiny_raw, tmp_path, key, value, expect):
    cfg = tmp_path / "bad.yml"
    cfg.write_text(yaml.safe_dump({**_valid_raw(tiny_raw), key: value}))
    r = subprocess.run([sys.executable, "train.py", str(cfg)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("config error: ") and expect in lines[0], r.stderr
    assert "Traceback" not in r.stderr and "training" not in r.stdout

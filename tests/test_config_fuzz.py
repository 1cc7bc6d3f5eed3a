"""Config fuzzing: mutated configs end in one clear ConfigError line (or are valid), never another exception;
and whatever `train.py --dry-run` accepts, a 1-rank `train.py` launch accepts and trains.

The mutations: wrong types, unknown keys, out-of-range values, broken `attention_config` patterns,
inconsistent parallel sizes, broken mixer sections, and keys of the nested sections (`optimizer`,
`optimizer.params`, `zero_optimization`, `fp16`, `bf16`, `ar_eval`) set to arbitrary values or to values at
the edges of their ranges. What runs is exactly what `train.py` runs before any process starts:
`config.build_args` + `config.check_paths`; a config that passes also builds (meta device) and its DeepSpeed
sections pass DeepSpeed's own config models.
"""
import contextlib
import copy
import io
import math
import subprocess
import sys

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT
from dist import run_ranks
from neox_zoology import registry
from neox_zoology.config import (AR_EVAL, BF16, FP16, OPTIMIZER, OPTIMIZER_PARAMS, ZERO, ConfigError, Rule,
                                 build_args, check_paths)
from neox_zoology.training import cli, dryrun
from neox_zoology.training.engine import deepspeed_config

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


SECTIONS = {("optimizer",): OPTIMIZER, ("optimizer", "params"): OPTIMIZER_PARAMS, ("zero_optimization",): ZERO,
            ("fp16",): FP16, ("bf16",): BF16, ("ar_eval",): AR_EVAL}


def edges(rule: Rule):
    """Values at and around the edges of a rule's range, and the usual near-misses of its type."""
    out = [None, True, False, "false", "1", "6e-4", 0, -1, 1, 2, 3, 0.5, math.nan, math.inf, [], {}]
    for bound in (rule.ge, rule.gt, rule.le, rule.lt):
        if bound is not None:
            out += [bound, bound - 1, bound + 1] + ([] if rule.kind == "int" else [bound - 1e-9, bound + 1e-9])
    out += [c for c in rule.choices] + [c.lower() for c in rule.choices if isinstance(c, str)]
    if rule.kind == "list":
        out += [[0.9, 0.95], [0.9], [0.9, 1.0], [0.0, 0.0], "0.9,0.95", [0.9, "0.95"]]
    if rule.kind == "dict":
        out += [{"device": "none"}, {"device": "cpu"}, {"device": None}]
    return st.sampled_from(out)


@st.composite
def mutations(draw):
    kind = draw(st.sampled_from(["type", "unknown", "range", "pattern", "parallel", "section", "nested", "nested"]))
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
    if kind == "nested":
        path = draw(st.sampled_from(sorted(SECTIONS)))
        section = SECTIONS[path]
        key = draw(st.sampled_from(sorted(section.keys) + sorted(section.refused) + ["bogus"]))
        rule = section.keys.get(key, Rule())
        return kind, (*path, key), draw(st.one_of(VALUES, edges(rule)))
    section = draw(st.sampled_from(registry.names()))
    return kind, section, draw(st.dictionaries(
        st.sampled_from(list(registry.get(section).defaults) + ["bogus"]), VALUES, max_size=2))


def apply(raw: dict, key, value) -> None:
    """Sets a top-level key, or a nested one given as a path (making the sections on the way mappings)."""
    if isinstance(key, str):
        raw[key] = value
        return
    node = raw
    for part in key[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[key[-1]] = value


def deepspeed_accepts(args) -> None:
    """DeepSpeed's own config models take the sections we pass on (they forbid unknown keys)."""
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    ds = deepspeed_config(args)
    DeepSpeedZeroConfig(**ds["zero_optimization"])
    DeepSpeedFP16Config(**ds["fp16"])
    DeepSpeedBF16Config(**ds["bf16"])


def _valid_raw(tiny_raw):
    return tiny_raw(attention_config=[[["baseconv", "hyena", "attention", "rwkv4"], "all"]])


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(muts=st.lists(mutations(), min_size=1, max_size=3), world=st.sampled_from([1, 2, 4]))
def test_mutated_configs_fail_with_one_clear_line_per_problem_or_are_valid(tiny_raw, muts, world):
    raw = copy.deepcopy(_valid_raw(tiny_raw))
    for _, key, value in muts:
        apply(raw, key, value)
    try:
        args = build_args(raw, {k: "fuzz.yml" for k in raw}, world_size=world)
        check_paths(args)
    except ConfigError as exc:
        lines = str(exc).splitlines()  # one line per problem, each mutation makes at most one
        assert lines and len(lines) <= len(muts) and all(ln and len(ln) < 2000 for ln in lines), str(exc)
        return
    # any other exception type propagates and fails the test with the mutated config in the report
    deepspeed_accepts(args)
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


# ----------------------------------------------------------------------------- dry run == launch


@st.composite
def launchable(draw, data_prefix: str, out_dir: str):
    """Config overrides drawn from every nested section and the ranged keys, mostly valid and often at the edge
    of a range (bucket sizes of 1-2 elements, betas of 0, seeds of 0 and 2**32-1, dropout just below 1, ...)."""
    pick = lambda values: draw(st.sampled_from(values))  # noqa: E731
    maybe = lambda: draw(st.booleans())  # noqa: E731
    zero = {"stage": pick([0, 1, 2])}
    for key, values in (("allgather_partitions", [True, False]), ("allgather_bucket_size", [2, 4096, 500000000]),
                        ("overlap_comm", [True, False]), ("reduce_scatter", [True, False]),
                        ("reduce_bucket_size", [1, 4096, 500000000]), ("contiguous_gradients", [True, False]),
                        ("round_robin_gradients", [True, False]), ("load_from_fp32_weights", [True, False]),
                        ("cpu_offload", [False]), ("offload_optimizer", [None, {"device": "none"}])):
        if maybe():
            zero[key] = pick(values)
    lr = pick([1e-6, 1e-3, 1.0])
    params = {"lr": lr}
    if maybe():
        params["betas"] = [pick([0.0, 0.9, 0.999]), pick([0.0, 0.95, 0.999])]
    if maybe():
        params["eps"] = pick([1e-12, 1e-8, 0.5])
    if maybe():
        params[pick(["adam_w_mode", "bias_correction"])] = True
    over = {
        "zero_optimization": zero,
        "optimizer": {"type": pick(["Adam", "adamw", "ADAM"]), "params": params},
        "weight_decay": pick([0, 0.1, 10.0]),
        "min_lr": pick([0, lr / 10, lr]),
        "gradient_clipping": pick([0, 1e-3, 1.0]),
        "warmup": pick([0, 0.5, 1]),
        "lr_decay_style": pick(["cosine", "linear", "constant"]),
        "lr_decay_iters": pick([None, 1, 10**6]),
        "bf16": {"enabled": maybe(), **({"immediate_grad_update": maybe()} if maybe() else {}),
                 **({"check_grad_overflow": maybe()} if maybe() else {})},
        "precision": pick([None, None, "fp32", "bfloat16"]),
        "fp16": pick([None, {"enabled": False}, {"fp16": True, "enabled": False, "loss_scale": 0,
                                                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}]),
        "hidden_dropout": pick([0, 0.5, 0.999]),
        "attention_dropout": pick([0, 0.999]),
        "seed": pick([0, 7, 2**32 - 1]),
        "pos_emb": pick(["rotary", "learned", "none"]),
        "max_position_embeddings": pick([None, 32, 64]),
        "intermediate_size": pick([None, 1, 48]),
        "pipe_parallel_size": pick([0, 0, 1]),
        "eval_iters": pick([0, 1]),
        "eval_interval": 1,
        "checkpoint_activations": maybe(),
        "checkpoint_num_layers": pick([1, 4]),
        "lm_head_chunk_tokens": pick([0, 1, 7]),
        "rotary_pct": pick([0, 0.25, 1]),
        "gpt_j_residual": maybe(),
        "no_weight_tying": maybe(),
        "eod_mask_loss": maybe(),
        "make_vocab_size_divisible_by": pick([1, 128]),
        "init_method": pick(["normal", "small_init"]),
    }
    if maybe():
        over["split"] = pick(["90,10,0", "90/10/0", " 90 , 10 ", "9,1", "100", "0.75,0.25,0"])
    else:
        over.update(data_path=None, train_data_paths=[data_prefix, data_prefix],
                    train_data_weights=pick([None, [1, 1], [1e-3, 1e3]]), valid_data_paths=[data_prefix])
    if maybe():
        run = f"{out_dir}/{draw(st.uuids()).hex}"
        over.update(save=f"{run}/ckpt", checkpoint_factor=1, keep_last_n_checkpoints=1, log_dir=f"{run}/logs",
                    tensorboard_dir=f"{run}/tb")
    return over


def test_whatever_the_dry_run_accepts_a_one_rank_launch_trains(tiny_raw, tiny_corpus, tmp_path, capfd):
    """`train.py CFG --dry-run` exit 0 => `train.py CFG` (1 rank, 1 step, forked) exit 0."""
    outcomes = []

    @settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(over=launchable(tiny_corpus["data_prefix"], str(tmp_path / "runs")))
    def dry_run_accepts_implies_launch_trains(over):
        cfg = tmp_path / f"cfg{len(outcomes)}.yml"
        cfg.write_text(yaml.safe_dump({**tiny_raw(train_iters=1), **over}))
        dry = cli.main([str(cfg), "--dry-run"])
        refused = capfd.readouterr().err
        if dry != 0:
            assert dry == 2 and refused.startswith("config error: "), refused
            outcomes.append(refused.strip())
            return
        (rc, err), = run_ranks(_launch, 1, str(cfg), timeout=120)
        assert rc == 0, err
        outcomes.append("trained")

    dry_run_accepts_implies_launch_trains()
    assert outcomes.count("trained") >= 10, outcomes


def _launch(rank, cfg):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main([cfg])
    return rc, err.getvalue()[-3000:]

"""The config schema as a specification: one row per fault (the config fragment and the one line it gets),
what valid values become, and what the optimizer and DeepSpeed receive.

Every row is refused by `config.build_args` + `config.check_paths` (what train.py runs before any process
group starts), and `train.py --dry-run` and a real 1-rank `train.py` launch refuse it with the same line.
"""
import contextlib
import io
import math

import pytest
import torch
import yaml

from dist import run_ranks
from neox_zoology.config import (AR_EVAL_DEFAULTS, BF16, FP16, ZERO, ConfigError, build_args, check_paths,
                                 writable_problem)
from neox_zoology.training import cli
from neox_zoology.training.engine import deepspeed_config, make_optimizer

BASE = {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32, "vocab_size": 100}
OPT = {"type": "Adam", "params": {"lr": 1.0e-3}}


def params(**p):
    return {"optimizer": {"type": "Adam", "params": {"lr": 1.0e-3, **p}}}


# (id, config fragment, expected message fragment). "{file}" is an existing regular file, "{tmp}" a writable
# directory: the rows about paths use them.
FAULTS = [
    # ---- values that were taken wrongly (training ran and exited 0)
    ("bf16-enabled-string", {"bf16": {"enabled": "false"}}, "bf16.enabled: 'false'; use true or false (unquoted)"),
    ("min-lr-negative", {"min_lr": -1}, "min_lr: -1.0; use a non-negative number"),
    ("keep-last-negative", {"keep_last_n_checkpoints": -1},
     "keep_last_n_checkpoints: -1; use a positive integer or null (null keeps every checkpoint)"),
    ("keep-last-zero", {"keep_last_n_checkpoints": 0}, "keep_last_n_checkpoints: 0; use a positive integer or null"),
    ("checkpoint-factor-negative", {"checkpoint_factor": -1},
     "checkpoint_factor: -1; use a positive integer or null (null: no periodic saves)"),
    ("gradient-clipping-negative", {"gradient_clipping": -1},
     "gradient_clipping: -1.0; use a non-negative number (0 turns clipping off)"),
    ("lr-decay-iters-zero", {"lr_decay_iters": 0}, "lr_decay_iters: 0; use a positive integer or null"),
    ("lr-decay-iters-negative", {"lr_decay_iters": -5}, "lr_decay_iters: -5; use a positive integer or null"),
    ("weight-decay-negative", {"weight_decay": -0.1}, "weight_decay: -0.1; use a non-negative number"),
    ("optimizer-params-weight-decay", params(weight_decay=0.1),
     "optimizer.params.weight_decay: 0.1; GPT-NeoX takes weight decay only from the top-level key weight_decay"),
    ("optimizer-params-unknown", params(momentum=0.9),
     "optimizer.params.momentum: unknown key (valid: lr, betas, eps, adam_w_mode, bias_correction, amsgrad)"),
    ("data-path-and-train-data-paths", {"data_path": "data/a", "train_data_paths": ["data/b"]},
     "train_data_paths and data_path are both set; give either data_path"),
    ("split-negative-part", {"split": "-5,10,0"},
     "split: '-5,10,0'; use up to three non-negative proportions 'train,valid,test'"),
    ("intermediate-size-zero", {"intermediate_size": 0}, "intermediate_size: 0; use a positive integer or null"),
    # ---- optimizer section (was a traceback inside the optimizer)
    ("lr-null", params(lr=None), "optimizer.params.lr: null; use a positive number (the peak learning rate)"),
    ("lr-zero", params(lr=0), "optimizer.params.lr: 0.0; use a positive number"),
    ("lr-string", params(lr="6e-4"), "optimizer.params.lr: '6e-4'; use a positive number (the peak learning rate; "
                                     "YAML read it as text"),
    ("lr-missing", {"optimizer": {"type": "Adam", "params": {"eps": 1e-8}}}, "optimizer.params.lr is missing; set it"),
    ("params-missing", {"optimizer": {"type": "Adam"}}, "optimizer.params is missing; set it to a mapping"),
    ("optimizer-type", {"optimizer": {"type": "SGD", "params": {"lr": 0.1}}},
     "optimizer.type: 'SGD' is not supported; use one of Adam, AdamW"),
    ("optimizer-not-mapping", {"optimizer": "adam"}, "optimizer: 'adam'; use a mapping, e.g. {type: Adam"),
    ("betas-string", params(betas="0.9,0.95"),
     "optimizer.params.betas: '0.9,0.95'; use a list of 2 entries, each a number in [0, 1)"),
    ("betas-length", params(betas=[0.9]), "optimizer.params.betas: [0.9]; use a list of 2 entries"),
    ("betas-range", params(betas=[0.9, 1.5]), "optimizer.params.betas[1]: 1.5; use a number in [0, 1)"),
    ("betas-type", params(betas=[0.9, True]), "optimizer.params.betas[1]: true; use a number in [0, 1)"),
    ("eps-zero", params(eps=0), "optimizer.params.eps: 0.0; use a positive number"),
    ("eps-negative", params(eps=-1e-8), "optimizer.params.eps: -1e-08; use a positive number"),
    ("adam-w-mode-false", params(adam_w_mode=False), "optimizer.params.adam_w_mode: false; only true is supported"),
    ("amsgrad-true", params(amsgrad=True), "optimizer.params.amsgrad: true; only false is supported"),
    # ---- zero_optimization (was DeepSpeed's pydantic error or assertion after the process group started)
    ("zero-stage-3", {"zero_optimization": {"stage": 3}},
     "zero_optimization.stage: 3; use an integer in [0, 2] (ZeRO-3 is not supported"),
    ("zero-stage-string", {"zero_optimization": {"stage": "1"}}, "zero_optimization.stage: '1'; use an integer in"),
    ("zero-overlap-string", {"zero_optimization": {"stage": 1, "overlap_comm": "yes"}},
     "zero_optimization.overlap_comm: 'yes'; use true or false"),
    ("zero-bucket-zero", {"zero_optimization": {"stage": 1, "reduce_bucket_size": 0}},
     "zero_optimization.reduce_bucket_size: 0; use a positive integer"),
    ("zero-bucket-float", {"zero_optimization": {"stage": 1, "reduce_bucket_size": 5.0e8}},
     "zero_optimization.reduce_bucket_size: 500000000.0; use a positive integer"),
    ("zero-allgather-odd", {"zero_optimization": {"stage": 1, "allgather_bucket_size": 3}},
     "zero_optimization.allgather_bucket_size: 3; use an even number of elements"),
    ("zero-unknown-key", {"zero_optimization": {"stage": 1, "reduce_bucket": 10}},
     "zero_optimization.reduce_bucket: unknown key; did you mean reduce_bucket_size?"),
    ("zero-cpu-offload", {"zero_optimization": {"stage": 2, "cpu_offload": True}},
     "zero_optimization.cpu_offload: true; only false is supported here (ZeRO-Offload steps DeepSpeed's CPU Adam"),
    ("zero-offload-optimizer", {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
     "zero_optimization.offload_optimizer: {'device': 'cpu'}; ZeRO-Offload steps DeepSpeed's CPU Adam"),
    ("zero-stage3-key", {"zero_optimization": {"stage": 2, "stage3_max_live_parameters": 10}},
     "zero_optimization.stage3_max_live_parameters: 10; a ZeRO stage-3 setting"),
    ("zero-2-with-pipeline", {"zero_optimization": {"stage": 2}, "pipe_parallel_size": 1},
     "zero_optimization.stage 2 with pipe_parallel_size 1: DeepSpeed's pipeline engine takes ZeRO stage 0 or 1"),
    ("zero-not-mapping", {"zero_optimization": 1}, "zero_optimization: 1; use a mapping, e.g. {stage: 1"),
    # ---- fp16 / bf16 / precision
    ("fp16-enabled-string", {"fp16": {"enabled": "true"}}, "fp16.enabled: 'true'; use true or false"),
    ("fp16-loss-scale-negative", {"fp16": {"enabled": False, "loss_scale": -1}},
     "fp16.loss_scale: -1.0; use a non-negative number (0 = dynamic loss scaling)"),
    ("fp16-master-weights", {"fp16": {"fp16_master_weights_and_grads": True}},
     "fp16.fp16_master_weights_and_grads: true; needs DeepSpeed's CPU Adam"),
    ("bf16-unknown-key", {"bf16": {"enable": True}}, "bf16.enable: unknown key; did you mean enabled?"),
    ("bf16-not-mapping", {"bf16": True}, "bf16: true; use a mapping, e.g. {enabled: true} or null"),
    ("fp16-and-bf16", {"fp16": {"enabled": True}, "bf16": {"enabled": True}},
     "fp16.enabled and bf16.enabled are both true; enable one"),
    ("precision-contradicts-bf16", {"precision": "fp32", "bf16": {"enabled": True}},
     "precision: fp32 contradicts bf16.enabled: true"),
    ("precision-unknown", {"precision": "bf16"},
     "precision: 'bf16' is not supported (did you mean fp16?); use one of fp32, fp16, bfloat16 (GPT-NeoX spells bf16 "
     "bfloat16)"),
    # ---- dropout, widths, positions, seeds
    ("hidden-dropout-one", {"hidden_dropout": 1}, "hidden_dropout: 1.0; use a number in [0, 1)"),
    ("attention-dropout-negative", {"attention_dropout": -0.1}, "attention_dropout: -0.1; use a number in [0, 1)"),
    ("hidden-size-negative", {"hidden_size": -64}, "hidden_size: -64; use a positive integer"),
    ("intermediate-size-negative", {"intermediate_size": -1}, "intermediate_size: -1; use a positive integer"),
    ("vocab-size-negative", {"vocab_size": -5}, "vocab_size: -5; use a positive integer or null"),
    ("max-positions-negative", {"max_position_embeddings": -1}, "max_position_embeddings: -1; use a positive integer"),
    ("learned-positions-short", {"pos_emb": "learned", "max_position_embeddings": 16},
     "max_position_embeddings 16 is shorter than seq_length 32: learned positions need one table row per position"),
    ("seed-negative", {"seed": -1}, "seed: -1; use an integer in [0, 4294967295]"),
    ("seed-too-large", {"seed": 2**32}, "seed: 4294967296; use an integer in [0, 4294967295]"),
    ("seed-float", {"seed": 1.5}, "seed: 1.5; use an integer in [0, 4294967295]"),
    ("num-layers-huge", {"num_layers": 10**9}, "num_layers: 1000000000; use an integer in [1, 100000]"),
    ("warmup-infinite", {"warmup": math.inf}, "warmup: inf; use a number in [0, 1]"),
    ("rotary-pct-range", {"rotary_pct": 1.5}, "rotary_pct: 1.5; use a number in [0, 1]"),
    ("eval-iters-negative", {"eval_iters": -1}, "eval_iters: -1; use a non-negative integer (0 = no validation)"),
    ("bool-as-string", {"no_weight_tying": "true"}, "no_weight_tying: 'true'; use true or false"),
    ("int-as-bool", {"train_iters": True}, "train_iters: true; use a positive integer"),
    # ---- data weights and split
    ("weights-negative", {"train_data_paths": ["a", "b"], "train_data_weights": [1.0, -1.0]},
     "train_data_weights[1]: -1.0; use a positive number"),
    ("weights-zero", {"train_data_paths": ["a"], "train_data_weights": [0]},
     "train_data_weights[0]: 0.0; use a positive number"),
    ("weights-nan", {"train_data_paths": ["a"], "train_data_weights": [math.nan]},
     "train_data_weights[0]: nan; use a positive number"),
    ("weights-string", {"train_data_paths": ["a"], "train_data_weights": ["1"]},
     "train_data_weights[0]: '1'; use a positive number"),
    ("weights-count", {"train_data_paths": ["a", "b"], "train_data_weights": [1.0]},
     "train_data_weights has 1 entries for 2 train_data_paths; give one weight per prefix"),
    ("weights-without-paths", {"valid_data_weights": [1.0]}, "valid_data_weights has 1 entries for 0 valid_data_paths"),
    ("paths-not-strings", {"train_data_paths": [1]}, "train_data_paths[0]: 1; use a string"),
    ("paths-empty", {"train_data_paths": []}, "train_data_paths: []; give at least one .bin/.idx prefix"),
    ("valid-without-train", {"valid_data_paths": ["a"]}, "valid_data_paths is set but train_data_paths is not"),
    ("split-separator", {"split": "90;10"}, "split: '90;10'; use up to three non-negative proportions"),
    ("split-four-parts", {"split": "1,2,3,4"}, "split: '1,2,3,4'; use up to three"),
    ("split-exponent", {"split": "1e2,1,0"}, "split: '1e2,1,0'; use up to three"),
    ("split-zero", {"split": "0,0,0"}, "split: '0,0,0'; the proportions add up to 0"),
    ("split-number", {"split": 100}, "split: 100; use a string"),
    # ---- directories the run writes (checked writable; nothing is created)
    ("save-under-file", {"save": "{file}/ckpt"}, "save: {file} is a file, so {file}/ckpt cannot be created"),
    ("log-dir-is-file", {"log_dir": "{file}"}, "log_dir: {file} exists and is not a directory"),
    ("tensorboard-unwritable", {"tensorboard_dir": "/proc/1/tb"}, "tensorboard_dir: /proc/1 is not writable"),
    ("data-cache-under-file", {"data_cache_path": "{file}/a/b"}, "data_cache_path: {file} is a file, so"),
    ("save-empty", {"save": " "}, "save: ' '; give a directory (or null for none)"),
    # ---- GPT-NeoX keys accepted only where they change nothing
    ("neox-gqa", {"num_kv_heads": 3}, "num_kv_heads 3 does not divide num_attention_heads"),
    ("neox-bnb", {"use_bnb_optimizer": True}, "use_bnb_optimizer: true; bitsandbytes' 8-bit Adam is not implemented"),
    ("neox-doc-weights", {"weight_by_num_documents": True},
     "weight_by_num_documents: true; weighting datasets by document count is not implemented"),
    ("neox-amp", {"amp": {"enabled": True}}, "amp: {'enabled': True}; apex AMP is not implemented here (use bf16)"),
    ("neox-predivide", {"gradient_predivide_factor": 2.0},
     "gradient_predivide_factor: 2.0; DeepSpeed's gradient pre-division is not passed on here"),
]


@pytest.fixture
def fill(tmp_path):
    """Substitutes {file} and {tmp} in a row."""
    file = tmp_path / "a_file"
    file.write_text("x")

    def sub(obj):
        if isinstance(obj, str):
            return obj.replace("{file}", str(file)).replace("{tmp}", str(tmp_path))
        if isinstance(obj, dict):
            return {k: sub(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [sub(v) for v in obj]
        return obj

    return sub


@pytest.mark.parametrize("fragment,message", [r[1:] for r in FAULTS], ids=[r[0] for r in FAULTS])
def test_fault_is_one_clear_line(fill, fragment, message):
    fragment, message = fill(fragment), fill(message)
    with pytest.raises(ConfigError) as err:
        check_paths(build_args({**BASE, **fragment}, {k: "cfg.yml" for k in fragment}, world_size=1), need_data=False)
    assert str(err.value).startswith(f"cfg.yml: {message}"), str(err.value)
    assert "\n" not in str(err.value)


def _cli_in_child(rank, argv):
    """train.py's main in a forked rank (so a launch that got through could not touch the test process)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, err.getvalue()


def test_dry_run_and_launch_refuse_every_fault_with_the_same_line(fill, tmp_path, capfd):
    for name, fragment, message in FAULTS:
        cfg = tmp_path / f"{name}.yml"
        cfg.write_text(yaml.safe_dump({**BASE, **fill(fragment)}))
        assert cli.main([str(cfg), "--dry-run"]) == 2, name
        dry = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
        (rc, launch), = run_ranks(_cli_in_child, 1, [str(cfg)])
        launch = [line for line in launch.splitlines() if line.strip()]
        assert rc == 2 and dry == launch, (name, dry, launch)
        assert len(dry) == 1 and dry[0].startswith(f"config error: {cfg}: {fill(message)}"), (name, dry)


# ----------------------------------------------------------------------------- what valid values become


def test_section_defaults_are_filled_and_names_normalised():
    args = build_args({**BASE, "optimizer": {"type": "adamw", "params": {"lr": 3}}, "bf16": None,
                       "zero_optimization": {"stage": 1, "reduce-bucket-size": 1000}}, world_size=1)
    assert args.optimizer == {"type": "AdamW", "params": {"lr": 3.0, "betas": [0.9, 0.999], "eps": 1e-8}}
    assert args.bf16 == {"enabled": False} and args.fp16 == {"enabled": False}
    assert args.zero_optimization == {"stage": 1, "reduce_bucket_size": 1000}
    assert args.ar_eval == AR_EVAL_DEFAULTS
    assert isinstance(args.lr, float) and args.lr == 3.0


def test_defaults_a_neox_config_may_leave_out_are_gpt_neoxs():
    """GPT-NeoX's megatron/neox_arguments: weight_decay 0.1, lr_decay_style linear, warmup 0.01, min_lr 0,
    seed 1234, split '969, 30, 1', dropout 0, gradient_clipping 1.0; NeoX keys that would change the numbers
    are accepted at their defaults (and listed as having no effect)."""
    args = build_args(BASE, world_size=1)
    assert (args.weight_decay, args.lr_decay_style, args.warmup, args.min_lr, args.seed, args.split) == (
        0.1, "linear", 0.01, 0.0, 1234, "969, 30, 1")
    assert (args.hidden_dropout, args.attention_dropout, args.gradient_clipping) == (0.0, 0.0, 1.0)
    accepted = build_args({**BASE, "amp": {"enabled": False}, "use_bnb_optimizer": False, "weight_by_num_documents": False,
                           "gradient_predivide_factor": 1.0}, world_size=1)
    assert sorted(accepted.ignored_keys) == ["amp", "gradient_predivide_factor", "use_bnb_optimizer",
                                             "weight_by_num_documents"]


@pytest.mark.parametrize("fragment,dtype", [
    ({}, "fp32"), ({"bf16": {"enabled": False}}, "fp32"), ({"bf16": {"enabled": True}}, "bf16"),
    ({"precision": "bfloat16"}, "bf16"), ({"precision": "bfloat16", "bf16": {"enabled": True}}, "bf16"),
    ({"precision": "fp32", "fp16": {"enabled": False, "loss_scale": 0}}, "fp32"),
])
def test_precision_follows_the_sections_and_the_shorthand(fragment, dtype):
    assert build_args({**BASE, **fragment}, world_size=1).dtype_name == dtype


@pytest.mark.parametrize("split", ["969, 30, 1", "90/10/0", "9,1", "100", "0.9,0.1,0", ".5,.5"])
def test_split_forms_gpt_neox_accepts(split):
    assert build_args({**BASE, "split": split}, world_size=1).split == split


def test_blend_weights_default_to_equal_as_in_gpt_neox():
    args = build_args({**BASE, "train_data_paths": ["a", "b"], "train_data_weights": [1, 3],
                       "valid_data_paths": ["c", "d"]}, world_size=1)
    assert args.train_data_weights == [1.0, 3.0] and args.valid_data_weights == [1.0, 1.0]
    assert args.test_data_weights is None


def test_writable_directories_are_checked_without_creating_anything(tmp_path):
    deep = tmp_path / "runs" / "a" / "b"
    assert writable_problem(str(deep)) is None and writable_problem(str(tmp_path)) is None
    args = build_args({**BASE, "save": str(deep / "ckpt"), "log_dir": str(deep / "logs"),
                       "tensorboard_dir": str(deep / "tb"), "data_cache_path": str(deep / "cache")}, world_size=1)
    check_paths(args, need_data=False)
    assert list(tmp_path.iterdir()) == []


def test_real_neox_sections_are_accepted_by_deepspeeds_own_config_models():
    """What we pass on is what DeepSpeed's pydantic models take (they forbid unknown keys)."""
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    pythia_fp16 = {"fp16": True, "enabled": True, "loss_scale": 0, "loss_scale_window": 1000,
                   "initial_scale_power": 12, "hysteresis": 2, "min_loss_scale": 1}
    pythia_zero = {"stage": 1, "allgather_partitions": True, "allgather_bucket_size": 500000000,
                   "overlap_comm": True, "reduce_scatter": True, "reduce_bucket_size": 500000000,
                   "contiguous_gradients": True, "cpu_offload": False}
    every_zero_key = {**pythia_zero, "round_robin_gradients": False, "load_from_fp32_weights": True,
                      "offload_optimizer": {"device": "none"}, "offload_param": None}
    every_fp16_key = {**pythia_fp16, "type": "fp16", "auto_cast": False, "consecutive_hysteresis": False}
    for zero in (pythia_zero, every_zero_key):
        DeepSpeedZeroConfig(**ZERO.for_deepspeed(ZERO.normalized(zero)))
    for fp16 in (pythia_fp16, every_fp16_key):
        passed = FP16.for_deepspeed(FP16.normalized(fp16))
        assert "fp16" not in passed and "type" not in passed
        DeepSpeedFP16Config(**passed)
    DeepSpeedBF16Config(**BF16.for_deepspeed(BF16.normalized({"enabled": True, "immediate_grad_update": True,
                                                                "check_grad_overflow": False})))


def test_deepspeed_config_carries_the_validated_sections():
    args = build_args({**BASE, "gradient_clipping": 0, "bf16": {"enabled": True, "check_grad_overflow": False},
                       "zero_optimization": {"stage": 1, "reduce_bucket_size": 4096}}, world_size=1)
    ds = deepspeed_config(args)
    assert ds["gradient_clipping"] == 0.0
    assert ds["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 4096}
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": False}
    assert ds["fp16"] == {"enabled": False}


def test_optimizer_gets_lr_betas_eps_from_params_and_weight_decay_from_the_top_level():
    args = build_args({**BASE, "weight_decay": 0.25, "optimizer": {"type": "Adam", "params": {
        "lr": 2.0e-3, "betas": [0.8, 0.9], "eps": 1.0e-6, "adam_w_mode": True}}}, world_size=1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt, _ = make_optimizer(args, model)
    assert isinstance(opt, torch.optim.AdamW)  # decoupled weight decay, GPT-NeoX's Adam (FusedAdam adam_w_mode)
    decay, no_decay = opt.param_groups
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])] and decay["weight_decay"] == 0.25
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0
    for group in opt.param_groups:
        assert (group["initial_lr"], group["betas"], group["eps"]) == (2.0e-3, (0.8, 0.9), 1.0e-6)

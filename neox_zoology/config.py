"""GPT-NeoX YAML -> one typed `Args` object: merge, expand, validate, derive.

Rules (GPT-NeoX's, so its configs load unmodified):
- one or several YAML files; keys may use `-` or `_`; a key set in two files is an error naming both;
- `attention_config: [[["baseconv", "attention"], 12]]` expands `[[pattern, count], ...]` into one
  layer type per layer, the pattern repeated over `count` layers; `count: "all"` means num_layers;
- deliberate overrides come after the files: `--override FILE` (may replace keys) and `--set key=value`.

Everything is validated before any process group starts. A problem is reported as one `ConfigError`
line naming the file, key, value and the fix; `train.py` prints it and exits non-zero.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from neox_zoology import registry


MAX_LAYERS = 100_000
"""Sanity bound: the layer pattern is expanded to a list of num_layers entries before anything else."""


class ConfigError(ValueError):
    """A configuration problem, phrased for the user (one line)."""


def _doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass
class Args:
    # ---- model ----
    num_layers: int = _doc("number of blocks", 12)
    hidden_size: int = _doc("model width d", 768)
    num_attention_heads: int = _doc("heads of attention-type layers (d must divide by it)", 12)
    seq_length: int = _doc("training sequence length L", 2048)
    max_position_embeddings: int | None = _doc("learned-position table size (default seq_length)", None)
    attention_config: Any = _doc("layer types per layer, NeoX syntax: [[[types...], count|'all'], ...]", None)
    norm: str = _doc("block norm: layernorm | rmsnorm", "layernorm")
    layernorm_epsilon: float = _doc("LayerNorm epsilon", 1e-5)
    rms_norm_epsilon: float = _doc("RMSNorm epsilon", 1e-8)
    activation: str = _doc("MLP activation: gelu | swiglu", "gelu")
    intermediate_size: int | None = _doc("MLP width (default 4d for gelu, 8d/3 rounded to 64 for swiglu)", None)
    mlp_bias: bool = _doc("biases in the MLP linear layers", True)
    use_bias_in_attn_linear: bool = _doc("biases in attention's QKV/output projections", True)
    pos_emb: str = _doc("position encoding: rotary | learned | none", "learned")
    rotary_pct: float = _doc("fraction of each head's channels that rotary rotates", 1.0)
    rotary_emb_base: float = _doc("rotary base", 10000.0)
    no_weight_tying: bool = _doc("untie the input embedding and the LM head", False)
    gpt_j_residual: bool = _doc("parallel residual: x + mixer(ln1 x) + mlp(ln2 x)", False)
    init_method: str = _doc("normal | scaled_normal | small_init | wang_init", "normal")
    output_layer_init_method: str = _doc("init of output projections (same names)", "scaled_normal")
    init_method_std: float = _doc("std of the 'normal' init methods", 0.02)
    hidden_dropout: float = _doc("dropout on block outputs", 0.0)
    attention_dropout: float = _doc("dropout on attention probabilities", 0.0)
    make_vocab_size_divisible_by: int = _doc("pad the vocabulary to a multiple of this x TP", 128)
    vocab_size: int | None = _doc("tokenizer vocabulary size; default: read from the tokenizer files", None)
    output_layer_parallelism: str = _doc("LM head split; only 'column' (vocab-parallel) is supported", "column")
    # ---- parallelism ----
    pipe_parallel_size: int = _doc("pipeline stages; 0 = plain DeepSpeed engine, >=1 = pipeline engine", 0)
    model_parallel_size: int = _doc("tensor-parallel size (megatron-core TP)", 1)
    pipe_partition_method: str = _doc("DeepSpeed layer partitioning (NeoX's default maps to our blocks)", "type:ZooBlock")
    zero_optimization: dict = _doc("DeepSpeed ZeRO section (stage 0-2)", factory=lambda: {"stage": 0})
    # ---- optimisation ----
    optimizer: dict = _doc("{type: Adam|AdamW, params: {lr, betas, eps}}", factory=lambda: {"type": "Adam", "params": {"lr": 6e-4}})
    weight_decay: float = _doc("AdamW-style decoupled weight decay (not on biases and norms)", 0.01)
    min_lr: float = _doc("floor of the LR schedule", 0.0)
    warmup: float = _doc("warm-up as a fraction of lr_decay_iters", 0.01)
    lr_decay_style: str = _doc("cosine | linear | constant", "cosine")
    lr_decay_iters: int | None = _doc("iterations of the decay (default train_iters)", None)
    train_iters: int = _doc("optimizer steps", 1000)
    train_micro_batch_size_per_gpu: int = _doc("sequences per rank per micro step", 4)
    gradient_accumulation_steps: int = _doc("micro steps per optimizer step", 1)
    train_batch_size: int | None = _doc("global batch; checked against micro x accumulation x DP", None)
    gradient_clipping: float = _doc("global grad-norm clip (0 = off)", 1.0)
    fp16: dict = _doc("{enabled: bool, ...}: DeepSpeed fp16 (CUDA only)", factory=lambda: {"enabled": False})
    bf16: dict = _doc("{enabled: bool}: DeepSpeed bf16 (FFTs still run in fp32)", factory=lambda: {"enabled": False})
    precision: str | None = _doc("NeoX shorthand: fp32 | fp16 | bfloat16", None)
    seed: int = _doc("random seed", 1234)
    # ---- data ----
    data_path: str | None = _doc("one .bin/.idx prefix, split by `split`", None)
    train_data_paths: list | None = _doc("training prefixes (blended by train_data_weights)", None)
    valid_data_paths: list | None = _doc("validation prefixes", None)
    test_data_paths: list | None = _doc("test prefixes", None)
    train_data_weights: list | None = _doc("blend weights of train_data_paths", None)
    valid_data_weights: list | None = _doc("blend weights of valid_data_paths", None)
    test_data_weights: list | None = _doc("blend weights of test_data_paths", None)
    split: str = _doc("train,valid,test proportions of data_path", "969, 30, 1")
    data_cache_path: str | None = _doc("where megatron-core caches its sample indices", None)
    tokenizer_type: str = _doc("GPT2BPETokenizer | HFTokenizer | SPMTokenizer", "GPT2BPETokenizer")
    vocab_file: str | None = _doc("tokenizer vocabulary / model file", None)
    merge_file: str | None = _doc("GPT-2 merges file", None)
    eod_mask_loss: bool = _doc("mask the loss on end-of-document tokens", False)
    # ---- checkpoints, evaluation, logging ----
    save: str | None = _doc("checkpoint directory", None)
    load: str | None = _doc("checkpoint directory to resume from (latest tag)", None)
    finetune: bool = _doc(
        "load only the model weights from `load` and start at iteration 0 with a fresh optimizer and schedule "
        "(GPT-NeoX's meaning); changes that keep every parameter's shape are allowed and listed", False)
    load_fallback: bool = _doc(
        "if the checkpoint `latest` names fails verification, load the newest older one that verifies (said "
        "loudly) instead of stopping", False)
    overwrite_checkpoints: bool = _doc(
        "let a run write into a `save` folder that holds checkpoints it did not load from", False)
    checkpoint_factor: int | None = _doc("save every N iterations", None)
    extra_save_iters: list | None = _doc("extra iterations to save at", None)
    keep_last_n_checkpoints: int | None = _doc("prune older complete checkpoints", None)
    checkpoint_activations: bool = _doc("recompute each group of checkpoint_num_layers blocks in backward", False)
    checkpoint_num_layers: int = _doc("blocks per activation-checkpointing group", 1)
    lm_head_chunk_tokens: int = _doc(
        "LM head + loss in chunks of this many tokens, recomputed in backward, so the full [tokens, vocab] "
        "logits never exist (0 = whole micro-batch at once)", 0)
    compile: bool = _doc("torch.compile each block's mixer (measure first: bench.compile)", False)
    fused_norms: bool = _doc("use NVIDIA apex's fused LayerNorm/RMSNorm when apex is installed (CUDA)", True)
    max_nonfinite_steps: int = _doc(
        "steps with non-finite gradients are skipped; after this many in a row the run stops (exit 3)", 5)
    eval_interval: int = _doc("validation every N iterations", 1000)
    eval_iters: int = _doc("validation batches per evaluation", 10)
    log_interval: int = _doc("log every N iterations", 100)
    steps_per_print: int = _doc("DeepSpeed's own print interval", 10)
    tensorboard_dir: str | None = _doc("tensorboard event directory", None)
    log_dir: str | None = _doc("text log directory", None)
    ar_eval: dict = _doc(
        "AR-slice evaluation after each checkpoint: {enabled, iters, threshold, bigram_counts, reference, strict, "
        "timeout} (see README 'AR-slice evaluation')", factory=lambda: dict(AR_EVAL_DEFAULTS))
    # ---- per-mixer sections (one key per registered layer type) ----
    mixer_sections: dict = _doc("internal: the YAML sections of the layer types", factory=dict)
    # ---- derived (not YAML keys) ----
    layer_types: list = field(default_factory=list)
    padded_vocab_size: int = 0
    world_size: int = 1
    sources: dict = field(default_factory=dict)
    ignored_keys: list = field(default_factory=list)

    # ---------------------------------------------------------------- derived views
    @property
    def tp(self) -> int:
        return self.model_parallel_size

    @property
    def pp(self) -> int:
        return max(1, self.pipe_parallel_size)

    @property
    def dp(self) -> int:
        return max(1, self.world_size // (self.tp * self.pp))

    @property
    def global_batch(self) -> int:
        return self.train_micro_batch_size_per_gpu * self.gradient_accumulation_steps * self.dp

    @property
    def lr(self) -> float:
        return float(self.optimizer.get("params", {}).get("lr", 6e-4))

    @property
    def gated_mlp(self) -> bool:
        return self.activation == "swiglu"

    @property
    def ffn_hidden_size(self) -> int:
        if self.intermediate_size:
            return int(self.intermediate_size)
        if self.gated_mlp:
            return int(math.ceil(8 * self.hidden_size / 3 / 64) * 64)
        return 4 * self.hidden_size

    @property
    def dtype_name(self) -> str:
        if _enabled(self.bf16) or self.precision == "bfloat16":
            return "bf16"
        if _enabled(self.fp16) or self.precision == "fp16":
            return "fp16"
        return "fp32"

    def shape(self) -> registry.Shape:
        return registry.Shape(
            hidden_size=self.hidden_size, seq_length=self.seq_length,
            num_attention_heads=self.num_attention_heads, tp=self.tp, num_layers=self.num_layers,
        )

    def mixer_args(self, layer_type: str) -> dict:
        """Resolved YAML section of a layer type: defaults < inherited top-level keys < its section."""
        spec = registry.get(layer_type)
        inherited = {k: getattr(self, k) for k in spec.inherits}
        return registry.resolve_args(spec.name, {**inherited, **self.mixer_sections.get(spec.name, {})})

    def layer_occurrences(self) -> list[tuple[int, str]]:
        """(j, type) per layer: j counts earlier layers of the same type (for per-layer cycles)."""
        seen: dict[str, int] = {}
        out = []
        for t in self.layer_types:
            out.append((seen.get(t, 0), t))
            seen[t] = seen.get(t, 0) + 1
        return out

    def to_dict(self) -> dict:
        skip = {"mixer_sections", "layer_types", "padded_vocab_size", "world_size", "sources", "ignored_keys"}
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        out.update(self.mixer_sections)
        return out


AR_EVAL_DEFAULTS = {
    "enabled": False,
    "iters": 10,  # validation batches (global batches) per evaluation
    "threshold": 1250,  # an AR hit's bigram occurred at most this many times in training (the paper's value)
    "bigram_counts": None,  # .npz of training bigram counts (tokenization/bigrams.py)
    "reference": None,  # ar_slice.json (or run directory) of an attention run for gap attribution
    "strict": False,  # true: a failure inside the evaluation stops training
    "timeout": 1800.0,  # seconds; evaluation stops early (results marked truncated) after this
}


def _validate_ar_eval(args: Args, where) -> None:
    w = where("ar_eval")
    section = args.ar_eval
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError(f"{w}: ar_eval: {section!r} is not a mapping; use e.g. ar_eval: {{enabled: true, "
                          f"bigram_counts: data/bigrams.npz}}")
    section = {normalize_key(k): v for k, v in section.items()}
    unknown = sorted(set(section) - set(AR_EVAL_DEFAULTS))
    if unknown:
        hint = difflib.get_close_matches(unknown[0], AR_EVAL_DEFAULTS, n=1)
        raise ConfigError(f"{w}: ar_eval.{unknown[0]}: unknown key{'; did you mean ' + hint[0] + '?' if hint else ''}"
                          f" (valid: {', '.join(AR_EVAL_DEFAULTS)})")
    cfg = {**AR_EVAL_DEFAULTS, **section}
    for key in ("enabled", "strict"):
        if not isinstance(cfg[key], bool):
            raise ConfigError(f"{w}: ar_eval.{key}: {cfg[key]!r} is not true/false")
    for key in ("iters", "threshold"):
        v = cfg[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < (1 if key == "iters" else 0):
            raise ConfigError(f"{w}: ar_eval.{key}: {v!r}; use a{' positive' if key == 'iters' else ' non-negative'} integer")
    t = cfg["timeout"]
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0):
        raise ConfigError(f"{w}: ar_eval.timeout: {t!r}; use a positive number of seconds (or null for none)")
    for key in ("bigram_counts", "reference"):
        if cfg[key] is not None and not isinstance(cfg[key], str):
            raise ConfigError(f"{w}: ar_eval.{key}: {cfg[key]!r} is not a path")
    if cfg["enabled"]:
        if not cfg["bigram_counts"]:
            raise ConfigError(
                f"{w}: ar_eval.bigram_counts is not set but ar_eval.enabled is true; set it to the .npz of training "
                f"bigram counts (build it with tokenization/bigrams.py) or set ar_eval.enabled: false"
            )
        if not Path(cfg["bigram_counts"]).is_file():
            raise ConfigError(
                f"{w}: ar_eval.bigram_counts: file {cfg['bigram_counts']} not found; build it from the training data "
                f"with tokenization/bigrams.py and fix the path (or set ar_eval.enabled: false)"
            )
        if cfg["reference"] and not Path(cfg["reference"]).exists():
            raise ConfigError(
                f"{w}: ar_eval.reference: {cfg['reference']} not found; give the ar_slice.json (or the save directory) "
                f"of an evaluated attention run, or remove the key"
            )
    args.ar_eval = cfg


def _enabled(section) -> bool:
    return bool(section.get("enabled", False)) if isinstance(section, dict) else bool(section)


ARG_FIELDS = {f.name: f for f in dataclasses.fields(Args) if "doc" in f.metadata and f.name != "mixer_sections"}

# GPT-NeoX keys accepted for compatibility that change nothing in this stack (kernel-fusion switches,
# launcher/logging settings handled elsewhere, features of other model families). Logged once.
NEOX_NO_EFFECT = {
    "scaled_upper_triang_masked_softmax_fusion", "scaled_masked_softmax_fusion", "bias_gelu_fusion",
    "bias_dropout_fusion", "rope_fusion", "layernorm_fusion", "use_bnb_optimizer", "fp32_allreduce",
    "partition_activations", "synchronize_each_layer", "contiguous_checkpointing",
    "checkpoint_in_cpu", "wall_clock_breakdown",
    "distributed_backend", "hostfile", "include", "exclude", "num_gpus", "num_nodes", "master_port",
    "master_addr", "launcher", "deepspeed_mpi", "deepspeed_slurm", "data_impl", "num_workers",
    "mmap_warmup", "checkpoint_validation_with_forward_pass", "use_wandb", "wandb_project",
    "wandb_group", "wandb_team", "wandb_host", "wandb_init_all_ranks", "git_hash", "log_grad_norm",
    "log_grad_pct_zeros", "log_param_norm", "log_optimizer_states", "log_gradient_noise_scale",
    "gradient_noise_scale_n_batches", "gradient_noise_scale_cpu_offload", "dump_state",
    "memory_profiling", "profile", "profile_step_start", "profile_step_stop", "use_checkpoint_lr_scheduler",
    "override_lr_scheduler", "short_seq_prob", "eval_tasks", "sparsity_config", "opt_pos_emb_offset",
    "apply_query_key_layer_scaling", "attention_softmax_in_fp32", "rpe_num_buckets", "rpe_max_distance",
    "gmlp_attn_dim", "adlr_autoresume", "adlr_autoresume_interval", "onnx_safe", "comment",
    "no_load_optim", "no_load_rng", "no_save_optim", "no_save_rng", "zero_stage",
    "zero_reduce_scatter", "zero_contiguous_gradients", "zero_reduce_bucket_size",
    "zero_allgather_bucket_size", "amp", "autotuning", "flops_profiler", "comms_logger",
    "sequence_parallel", "num_kv_heads", "curriculum_learning", "loss_scale", "loss_scale_window",
    "hysteresis", "min_loss_scale", "initial_loss_scale", "prescale_gradients", "gradient_predivide_factor",
    "tensorboard", "wandb", "csv_monitor", "elasticity", "data_efficiency", "weight_by_num_documents",
    "weighted_sampler_alpha",
}

# NeoX values that mean the same as ours.
_NEOX_PARTITION_DEFAULTS = {"type:transformer", "type:transformer|mlp", "type:ParallelTransformerLayerPipe"}


def normalize_key(key: str) -> str:
    return str(key).replace("-", "_")


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return {normalize_key(k): v for k, v in data.items()}


def merge_files(paths, overrides=(), sets=()) -> tuple[dict, dict]:
    """Merged raw values and, per key, the file it came from."""
    merged: dict = {}
    source: dict = {}
    for p in paths:
        for k, v in read_yaml(p).items():
            if k in merged:
                raise ConfigError(
                    f"key '{k}' is set in both {source[k]} and {p}; set it in one file "
                    f"(or replace it deliberately with --override FILE / --set {k}=VALUE)"
                )
            merged[k], source[k] = v, str(p)
    for p in overrides:
        for k, v in read_yaml(p).items():
            merged[k], source[k] = v, f"{p} (override)"
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: use --set key=value (value in YAML syntax)")
        k, v = item.split("=", 1)
        k = normalize_key(k.strip())
        merged[k], source[k] = yaml.safe_load(v), f"--set {item}"
    return merged, source


def expand_attention_config(spec, num_layers: int, where: str = "attention_config") -> list[str]:
    """NeoX's `[[pattern, count], ...]` -> one layer type per layer."""
    if spec is None:
        return ["attention"] * num_layers
    if not isinstance(spec, list) or not spec:
        raise ConfigError(f"{where}: {spec!r} is not a list of [[types...], count] pairs, e.g. [[['baseconv', 'attention'], 12]]")
    types: list[str] = []
    for item in spec:
        if not (isinstance(item, (list, tuple)) and len(item) == 2):
            raise ConfigError(f"{where}: entry {item!r} is not a [[types...], count] pair")
        pattern, count = item
        if isinstance(pattern, str):
            pattern = [pattern]
        if not isinstance(pattern, list) or not pattern or not all(isinstance(t, str) for t in pattern):
            raise ConfigError(f"{where}: pattern {pattern!r} is not a non-empty list of layer-type names")
        if count == "all":
            count = num_layers
        if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
            raise ConfigError(f"{where}: count {count!r} in {item!r} must be a positive int or 'all'")
        types.extend(pattern[i % len(pattern)] for i in range(count))
    if len(types) != num_layers:
        raise ConfigError(
            f"{where}: expands to {len(types)} layers but num_layers is {num_layers}; make the counts add up to "
            f"num_layers (or use 'all')"
        )
    return types


def _suggest(key: str, candidates) -> str:
    close = difflib.get_close_matches(key, sorted(candidates), n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else "; see README 'Configuration keys' for the valid keys"


_TYPES = {int: (int,), float: (int, float), str: (str,), bool: (bool,), dict: (dict,), list: (list,)}


def _check_type(name: str, value, where: str):
    f = ARG_FIELDS[name]
    ann = str(f.type)
    if value is None and "None" in ann:
        return value
    base = ann.split("|")[0].strip()
    py = {"int": int, "float": float, "str": str, "bool": bool, "dict": dict, "list": list}.get(base)
    if py is None:
        return value
    ok = isinstance(value, _TYPES[py]) and not (py in (int, float) and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{where}: {name}: {value!r} is not a{'n' if base[0] in 'aeiou' else ''} {base}")
    return float(value) if py is float else value


def build_args(raw: dict, source: dict | None = None, world_size: int | None = None) -> Args:
    """Typed, validated Args from merged raw keys (no I/O besides tokenizer/data existence checks)."""
    source = source or {}
    where = lambda k: source.get(k, "config")  # noqa: E731
    args = Args()
    registered = set(registry.names(include_aliases=True))
    for key, value in raw.items():
        if key in ARG_FIELDS:
            setattr(args, key, _check_type(key, value, where(key)))
        elif key in registered:
            canon = registry.canonical(key)
            if not isinstance(value, dict):
                raise ConfigError(f"{where(key)}: {key}: expected a mapping of {canon} arguments, got {value!r}")
            try:
                registry.resolve_args(canon, value)
            except KeyError as exc:
                raise ConfigError(f"{where(key)}: {key}: {exc.args[0]}") from None
            args.mixer_sections[canon] = {normalize_key(k): v for k, v in value.items()}
        elif key in NEOX_NO_EFFECT:
            args.ignored_keys.append(key)
        else:
            raise ConfigError(
                f"{where(key)}: unknown key '{key}'{_suggest(key, set(ARG_FIELDS) | registered | NEOX_NO_EFFECT)}"
            )
    args.sources = dict(source)
    args.world_size = int(world_size or os.environ.get("WORLD_SIZE", 1))
    if args.pipe_partition_method in _NEOX_PARTITION_DEFAULTS:
        args.pipe_partition_method = "type:ZooBlock"
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if isinstance(args.num_layers, int) and args.num_layers > MAX_LAYERS:
        raise ConfigError(f"{where('num_layers')}: num_layers: {args.num_layers} is more than {MAX_LAYERS:,} layers; "
                          f"check the value (GPT-NeoX configs use 6 to 96)")
    try:
        types = expand_attention_config(args.attention_config, args.num_layers, f"{where('attention_config')}: attention_config")
        args.layer_types = [registry.canonical(t) for t in types]
    except KeyError as exc:
        raise ConfigError(f"{where('attention_config')}: attention_config: {exc.args[0]}") from None
    _validate(args, where)
    return args


def _positive(args: Args, where, *names):
    for n in names:
        v = getattr(args, n)
        if v is not None and v <= 0:
            raise ConfigError(f"{where(n)}: {n}: {v!r} must be positive")


def _validate(args: Args, where) -> None:
    _positive(args, where, "num_layers", "hidden_size", "num_attention_heads", "seq_length", "train_iters",
              "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "model_parallel_size",
              "log_interval", "eval_interval", "make_vocab_size_divisible_by", "max_nonfinite_steps",
              "checkpoint_num_layers")
    if args.pipe_parallel_size < 0:
        raise ConfigError(f"{where('pipe_parallel_size')}: pipe_parallel_size: {args.pipe_parallel_size} must be >= 0")
    if args.lm_head_chunk_tokens < 0:
        raise ConfigError(f"{where('lm_head_chunk_tokens')}: lm_head_chunk_tokens: {args.lm_head_chunk_tokens} must be "
                          ">= 0 (0 = unchunked)")
    choice = {
        "norm": ("layernorm", "rmsnorm"), "activation": ("gelu", "swiglu"),
        "pos_emb": ("rotary", "learned", "none"), "lr_decay_style": ("cosine", "linear", "constant"),
        "tokenizer_type": ("GPT2BPETokenizer", "HFTokenizer", "SPMTokenizer"),
        "output_layer_parallelism": ("column",),
        "init_method": ("normal", "scaled_normal", "small_init", "wang_init"),
        "output_layer_init_method": ("normal", "scaled_normal", "small_init", "wang_init"),
    }
    for key, options in choice.items():
        v = getattr(args, key)
        if v not in options:
            close = difflib.get_close_matches(str(v), options, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{where(key)}: {key}: {v!r} is not supported{hint}; use one of {', '.join(options)}")
    if args.precision not in (None, "fp32", "fp16", "bfloat16"):
        raise ConfigError(f"{where('precision')}: precision: {args.precision!r}; use fp32, fp16 or bfloat16")
    opt = args.optimizer
    if not isinstance(opt, dict) or str(opt.get("type", "Adam")).lower() not in ("adam", "adamw"):
        raise ConfigError(f"{where('optimizer')}: optimizer: {opt!r}; use {{type: Adam|AdamW, params: {{lr: ...}}}}")
    if "lr" not in opt.get("params", {}):
        raise ConfigError(f"{where('optimizer')}: optimizer.params.lr is missing; set e.g. optimizer: {{type: Adam, params: {{lr: 6.0e-4}}}}")
    if not 0 <= args.warmup <= 1:
        raise ConfigError(f"{where('warmup')}: warmup: {args.warmup}; it is a fraction of lr_decay_iters in [0, 1]")
    if args.min_lr > args.lr:
        raise ConfigError(f"{where('min_lr')}: min_lr {args.min_lr} is above lr {args.lr}")
    stage = args.zero_optimization.get("stage", 0) if isinstance(args.zero_optimization, dict) else None
    if stage not in (0, 1, 2):
        raise ConfigError(f"{where('zero_optimization')}: zero_optimization.stage: {stage!r}; use 0, 1 or 2")
    # shapes and parallel sizes
    d, heads, tp = args.hidden_size, args.num_attention_heads, args.tp
    if d % heads:
        raise ConfigError(f"{where('hidden_size')}: hidden_size {d} is not divisible by num_attention_heads {heads}")
    if d % tp:
        raise ConfigError(f"{where('model_parallel_size')}: hidden_size {d} is not divisible by model_parallel_size {tp}")
    uses_heads = any(registry.get(t).tp_split == "heads" for t in args.layer_types)
    if uses_heads and heads % tp:
        raise ConfigError(
            f"{where('model_parallel_size')}: num_attention_heads {heads} is not divisible by model_parallel_size {tp}"
        )
    if args.ffn_hidden_size % tp:
        raise ConfigError(f"{where('intermediate_size')}: MLP width {args.ffn_hidden_size} is not divisible by model_parallel_size {tp}")
    if args.pp > args.num_layers:
        raise ConfigError(f"{where('pipe_parallel_size')}: {args.pp} pipeline stages for {args.num_layers} layers")
    if args.world_size % (tp * args.pp):
        raise ConfigError(
            f"{where('model_parallel_size')}: {args.world_size} ranks do not divide into model_parallel_size {tp} x "
            f"pipeline stages {args.pp}; launch a multiple of {tp * args.pp} ranks"
        )
    if args.train_batch_size is not None and "gradient_accumulation_steps" not in args.sources:
        # NeoX: a global batch and a micro batch imply the accumulation steps at this DP size.
        per_step = args.train_micro_batch_size_per_gpu * args.dp
        if args.train_batch_size % per_step:
            raise ConfigError(
                f"{where('train_batch_size')}: train_batch_size {args.train_batch_size} is not a multiple of micro batch "
                f"{args.train_micro_batch_size_per_gpu} x DP {args.dp}; change one of them or the number of ranks"
            )
        args.gradient_accumulation_steps = args.train_batch_size // per_step
    if args.train_batch_size is not None and args.train_batch_size != args.global_batch:
        raise ConfigError(
            f"{where('train_batch_size')}: train_batch_size {args.train_batch_size} != micro batch "
            f"{args.train_micro_batch_size_per_gpu} x accumulation {args.gradient_accumulation_steps} x DP {args.dp}"
        )
    _validate_ar_eval(args, where)
    # per-mixer arguments at this shape
    shape = args.shape()
    for t in sorted(set(args.layer_types)):
        spec = registry.get(t)
        problems = spec.validate(shape, args.mixer_args(t))
        if problems:
            raise ConfigError(f"{where(t)}: {problems[0]}")
        for occ in range(args.layer_types.count(t)):
            spec.per_layer(args.mixer_args(t), occ)  # the per-layer arguments of valid sections build
    if args.dtype_name == "fp16" and not _cuda_available():
        raise ConfigError(
            f"{where('fp16' if 'fp16' in args.sources else 'precision')}: fp16 needs CUDA (DeepSpeed has no fp16 on CPU); "
            f"use --set fp16='{{enabled: false}}' or bf16 on this machine"
        )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def check_paths(args: Args, need_data: bool = True) -> None:
    """Existence of tokenizer files and data prefixes (training only; --dry-run skips data)."""
    for key in ("vocab_file", "merge_file"):
        p = getattr(args, key)
        if p and not Path(p).exists():
            raise ConfigError(f"{args.sources.get(key, 'config')}: {key}: file {p} not found; fix the path")
    if not need_data:
        return
    prefixes = []
    if args.data_path:
        prefixes.append(("data_path", args.data_path))
    for key in ("train_data_paths", "valid_data_paths", "test_data_paths"):
        prefixes += [(key, p) for p in getattr(args, key) or []]
    if not prefixes:
        raise ConfigError("no training data: set data_path (one .bin/.idx prefix) or train_data_paths")
    for key, prefix in prefixes:
        for ext in (".bin", ".idx"):
            if not Path(prefix + ext).exists():
                raise ConfigError(
                    f"{args.sources.get(key, 'config')}: {key}: {prefix}{ext} not found; give the prefix of a "
                    f".bin/.idx pair (see README 'Data')"
                )
        from neox_zoology.data import check_indexed_dataset

        check_indexed_dataset(prefix)  # whole and consistent, before any process starts
    for paths, weights in (("train_data_paths", "train_data_weights"), ("valid_data_paths", "valid_data_weights"),
                           ("test_data_paths", "test_data_weights")):
        p, w = getattr(args, paths), getattr(args, weights)
        if w is not None and (p is None or len(w) != len(p)):
            raise ConfigError(f"{args.sources.get(weights, 'config')}: {weights} has {len(w)} entries for "
                              f"{len(p or [])} {paths}")


def pad_vocab(vocab_size: int, multiple: int, tp: int) -> int:
    m = multiple * tp
    return int(math.ceil(vocab_size / m) * m)


def load(paths, overrides=(), sets=(), world_size: int | None = None) -> Args:
    raw, source = merge_files(paths, overrides, sets)
    return build_args(raw, source, world_size)

"""What one value's `Rule` cannot say: relations between keys (precision, data lists, shapes and parallel
sizes, batch sizes, MLP widths, grouped-query attention, the ar_eval section, each layer type's own section
at this shape)."""
from __future__ import annotations

from pathlib import Path

from neox_zoology import registry
from neox_zoology.config.args import ARG_RULES, Args
from neox_zoology.config.schema import ConfigError


def validate_ar_eval(args: Args, where, check_files: bool = True) -> None:
    """The ar_eval section (eval.standalone calls this again after applying its command-line values).
    `check_files`: also require its files (check_paths does that for a launch; a dry run only notes them)."""
    w = where("ar_eval")
    cfg = ARG_RULES["ar_eval"].check(args.ar_eval, "ar_eval", w)
    if cfg["enabled"] and not cfg["bigram_counts"]:
        raise ConfigError(
            f"{w}: ar_eval.bigram_counts is not set but ar_eval.enabled is true; set it to the .npz of training "
            f"bigram counts (build it with tokenization/bigrams.py) or set ar_eval.enabled: false"
        )
    args.ar_eval = cfg
    if check_files:
        problem = ar_eval_file_problem(args)
        if problem:
            raise ConfigError(f"{w}: {problem}")


def validate_eval_tasks(args: Args, where) -> None:
    """eval_tasks needs lm-eval installed; its companion keys mean nothing without it."""
    if not args.eval_tasks:
        if args.eval_tasks_include_path:
            args.config_notes.append("eval_tasks_include_path is set but eval_tasks is empty: no lm-eval tasks run")
        return
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(f"{where('eval_tasks')}: eval_tasks: {args.eval_tasks!r} needs lm-evaluation-harness, "
                          f"which is not installed; pip install '.[eval]' (or remove eval_tasks)")
    if not args.save:
        args.config_notes.append("eval_tasks: no `save` path, so no checkpoint is saved and no task runs")


def eval_tasks_path_problem(args: Args) -> str | None:
    """A missing eval_tasks_include_path folder, or None."""
    for folder in (args.eval_tasks_include_path or []) if args.eval_tasks else []:
        if not Path(folder).is_dir():
            return (f"eval_tasks_include_path: folder {folder} not found; give the folder of the task YAMLs "
                    f"(e.g. tests/data/lm_eval) or remove it")
    return None


def ar_eval_file_problem(args: Args) -> str | None:
    """What is missing of an enabled ar_eval's files (bigram counts, reference), or None."""
    cfg = args.ar_eval or {}
    if not cfg.get("enabled"):
        return None
    if not Path(cfg["bigram_counts"]).is_file():
        return (f"ar_eval.bigram_counts: file {cfg['bigram_counts']} not found; build it from the training data "
                f"with tokenization/bigrams.py (README 'Training on the Pile', step 3) and fix the path (or set "
                f"ar_eval.enabled: false)")
    if cfg["reference"] and not Path(cfg["reference"]).exists():
        return (f"ar_eval.reference: {cfg['reference']} not found; give the ar_slice.json (or the save directory) "
                f"of an evaluated attention run, or remove the key")
    return None


def _validate_attention_shape(args: Args, where) -> None:
    """Grouped-query attention and the sliding window: the keys agree and the layer types take them."""
    heads, kv, tp = args.num_attention_heads, args.kv_heads, args.tp
    if args.attention_type == "groupedquery" and args.num_kv_heads in (None, heads):
        raise ConfigError(f"{where('attention_type')}: attention_type: groupedquery needs num_kv_heads below "
                          f"num_attention_heads {heads}; set num_kv_heads (or remove attention_type)")
    if args.attention_type == "multihead" and kv != heads:
        raise ConfigError(f"{where('attention_type')}: attention_type: multihead contradicts num_kv_heads {kv}; "
                          f"remove one of them")
    grouped = kv != heads
    if grouped:
        if heads % kv:
            raise ConfigError(f"{where('num_kv_heads')}: num_kv_heads {kv} does not divide num_attention_heads "
                              f"{heads}; give a divisor of it")
        if kv % tp and tp % kv:
            raise ConfigError(f"{where('num_kv_heads')}: num_kv_heads {kv} and model_parallel_size {tp}: the kv "
                              f"heads split over TP ranks (kv a multiple of TP) or are replicated (TP a multiple "
                              f"of kv); change one of them")
    for t in sorted(set(args.layer_types)):
        spec = registry.get(t)
        if spec.tp_split != "heads":
            continue
        takes = "num_kv_heads" in spec.defaults
        if grouped and not takes:
            raise ConfigError(f"{where('num_kv_heads')}: num_kv_heads {kv}: layer type {t} has no grouped-query "
                              f"form; use attention layers (or remove num_kv_heads)")
    if args.sliding_window_width is not None:
        takers = [t for t in sorted(set(args.layer_types)) if "sliding_window_width" in registry.get(t).defaults]
        for t in takers:
            if "window" in args.mixer_sections.get(t, {}):
                raise ConfigError(f"{where('sliding_window_width')}: sliding_window_width and {t}.window are "
                                  f"both set; keep one")
        if not takers:
            raise ConfigError(f"{where('sliding_window_width')}: sliding_window_width: no layer type of this config "
                              f"takes a window; remove it")


def _validate_mlp(args: Args, where) -> None:
    """GPT-NeoX's MLP sizes must fit together (its rounding can make them disagree, which fails there)."""
    if any(registry.get(t).mlp is None for t in args.layer_types):
        first, second = args.mlp_widths
        if first != (2 if args.gated_mlp else 1) * second:
            key = "intermediate_size" if args.intermediate_size is not None else "mlp_multiple_of"
            raise ConfigError(
                f"{where(key)}: intermediate_size {args.ffn_hidden_size} with activation {args.activation} and "
                f"mlp_multiple_of {args.mlp_multiple_of}: GPT-NeoX's MLP rule gives a first projection of {first} "
                f"and a second of {second} inputs, which do not fit (GPT-NeoX fails on it); "
                + (f"set intermediate_size to 3 x each projection's width (e.g. {3 * args.ffn_hidden_size} for "
                   f"{args.ffn_hidden_size}-wide projections)" if args.gated_mlp else
                   f"set intermediate_size to a multiple of {2 * args.mlp_multiple_of}"))


DATA_LISTS = (("train_data_paths", "train_data_weights"), ("valid_data_paths", "valid_data_weights"),
               ("test_data_paths", "test_data_weights"))


def validate_args(args: Args, where) -> None:
    """What one value's Rule cannot say: relations between keys."""
    if args.min_lr > args.lr:
        raise ConfigError(f"{where('min_lr')}: min_lr {args.min_lr} is above lr {args.lr}")
    if args.pos_emb == "learned" and args.max_position_embeddings < args.seq_length:
        raise ConfigError(
            f"{where('max_position_embeddings')}: max_position_embeddings {args.max_position_embeddings} is shorter "
            f"than seq_length {args.seq_length}: learned positions need one table row per position; set it to at "
            f"least {args.seq_length} (or leave it unset)"
        )
    # precision: the DeepSpeed sections and GPT-NeoX's shorthand must agree (GPT-NeoX asserts the same)
    if args.fp16["enabled"] and args.bf16["enabled"]:
        raise ConfigError(f"{where('bf16')}: fp16.enabled and bf16.enabled are both true; enable one")
    enabled = "fp16" if args.fp16["enabled"] else "bf16" if args.bf16["enabled"] else None
    if args.precision is not None and enabled is not None and args.precision != {"fp16": "fp16", "bf16": "bfloat16"}[enabled]:
        raise ConfigError(f"{where('precision')}: precision: {args.precision} contradicts {enabled}.enabled: true; "
                          f"make them agree (or drop one)")
    if args.zero_optimization["stage"] >= 2 and args.pipe_parallel_size >= 1:
        raise ConfigError(
            f"{where('zero_optimization')}: zero_optimization.stage {args.zero_optimization['stage']} with "
            f"pipe_parallel_size {args.pipe_parallel_size}: DeepSpeed's pipeline engine takes ZeRO stage 0 or 1; use "
            f"stage 1 (or pipe_parallel_size: 0)"
        )
    # data: one prefix split by `split`, or per-split lists (GPT-NeoX refuses both as well)
    lists = [paths for paths, _ in DATA_LISTS if getattr(args, paths) is not None]
    if args.data_path is not None and lists:
        raise ConfigError(
            f"{where(lists[0])}: {lists[0]} and data_path are both set; give either data_path (split by `split`) or "
            f"train/valid/test_data_paths, not both"
        )
    if lists and args.train_data_paths is None:
        raise ConfigError(f"{where(lists[0])}: {lists[0]} is set but train_data_paths is not; give the training "
                          f"prefixes in train_data_paths")
    for paths_key, weights_key in DATA_LISTS:
        paths, weights = getattr(args, paths_key), getattr(args, weights_key)
        if paths is not None and not paths:
            raise ConfigError(f"{where(paths_key)}: {paths_key}: []; give at least one .bin/.idx prefix (or null)")
        if weights is not None and (paths is None or len(weights) != len(paths)):
            raise ConfigError(f"{where(weights_key)}: {weights_key} has {len(weights)} entries for "
                              f"{len(paths or [])} {paths_key}; give one weight per prefix")
        if paths is not None and weights is None:
            setattr(args, weights_key, [1.0] * len(paths))  # GPT-NeoX's default: equal weights
    # shapes and parallel sizes
    d, heads, tp = args.hidden_size, args.num_attention_heads, args.tp
    uses_heads = any(registry.get(t).tp_split == "heads" for t in args.layer_types)
    if d % heads and uses_heads:  # GPT-NeoX skips this check for Mamba models, whose layers have no heads
        raise ConfigError(f"{where('hidden_size')}: hidden_size {d} is not divisible by num_attention_heads {heads}")
    if d % tp:
        raise ConfigError(f"{where('model_parallel_size')}: hidden_size {d} is not divisible by model_parallel_size {tp}")
    if uses_heads and heads % tp:
        raise ConfigError(
            f"{where('model_parallel_size')}: num_attention_heads {heads} is not divisible by model_parallel_size {tp}"
        )
    if args.override_lr_scheduler and args.use_checkpoint_lr_scheduler:
        raise ConfigError(f"{where('override_lr_scheduler')}: override_lr_scheduler and use_checkpoint_lr_scheduler "
                          f"are both true; keep one (GPT-NeoX refuses the pair too)")
    _validate_attention_shape(args, where)
    _validate_mlp(args, where)
    for t in sorted(set(args.layer_types)):
        width = args.mlp_width if registry.get(t).mlp is None else args.ffn_hidden_size
        if width % tp:
            raise ConfigError(f"{where('intermediate_size')}: MLP width {width} is not divisible by "
                              f"model_parallel_size {tp}")
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
    validate_ar_eval(args, where, check_files=False)
    validate_eval_tasks(args, where)
    # per-mixer arguments at this shape
    shape = args.shape()
    for t in sorted(set(args.layer_types)):
        spec = registry.get(t)
        problems = spec.validate(shape, args.mixer_args(t))
        if problems:
            raise ConfigError(f"{where(t)}: {problems[0]}")
        for occ in range(args.layer_types.count(t)):
            spec.per_layer(args.mixer_args(t), occ)  # the per-layer arguments of valid sections build

"""`Args`, the typed config: every top-level key is a field carrying its documentation, default and `Rule`
(kind from its annotation); `ARG_RULES` is the schema of every top-level key."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from neox_zoology import registry
from neox_zoology.config.schema import Rule
from neox_zoology.config.sections import AR_EVAL, BF16, DATA_TYPES, FP16, OPTIMIZER, ZERO


MAX_LAYERS = 100_000
"""Sanity bound: the layer pattern is expanded to a list of num_layers entries before anything else."""

MISSING = dataclasses.MISSING


def _split_problem(text: str) -> str | None:
    """GPT-NeoX's `split`: up to three proportions train,valid,test separated by ',' or '/'."""
    parts = re.split(r"[,/]", text)
    if len(parts) > 3 or not all(re.fullmatch(r"\s*(\d+(\.\d*)?|\.\d+)\s*", p) for p in parts):
        return "use up to three non-negative proportions 'train,valid,test', e.g. '969,30,1'"
    if sum(float(p) for p in parts) <= 0:
        return "the proportions add up to 0; give the training part a positive share, e.g. '969,30,1'"
    return None


def _partition_problem(text: str) -> str | None:
    """DeepSpeed's PipelineModule partition methods."""
    if text in ("parameters", "uniform"):
        return None
    if text.startswith("type:") and len(text) > 5:
        try:
            re.compile(text[5:])
            return None
        except re.error as exc:
            return f"the layer-class regex does not compile ({exc})"
    return "use parameters, uniform or type:<layer-class regex> (default type:ZooBlock)"

def _nonempty(text: str) -> str | None:
    return None if text.strip() else "give a directory (or null for none)"

def _task_name_problem(text: str) -> str | None:
    if not text.strip() or "," in text:
        return "give one lm-eval task name per list entry, e.g. [lambada_openai, piqa]"
    return None

def _doc(text: str, default: Any = MISSING, factory: Any = MISSING, **rule):
    """A field of `Args`: its documentation, its default and its `Rule` (kind from the annotation)."""
    meta = {"doc": text, "rule": Rule(**rule)}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


_INIT_METHODS = ("normal", "scaled_normal", "small_init", "wang_init", "single_residual_scaled_normal")
GATED_ACTIVATIONS = ("geglu", "reglu", "swiglu", "bilinear", "glu")
ACTIVATIONS = ("gelu", "relu", "silu", "swish", "softsign", "mish", *GATED_ACTIVATIONS)


@dataclass
class Args:
    # ---- model ----
    num_layers: int = _doc("number of blocks", 12, ge=1, le=MAX_LAYERS, hint="GPT-NeoX configs use 6 to 96")
    hidden_size: int = _doc("model width d", 768, gt=0)
    num_attention_heads: int = _doc("heads of attention-type layers (d must divide by it)", 12, gt=0)
    seq_length: int = _doc("training sequence length L", 2048, gt=0)
    max_position_embeddings: int | None = _doc("learned-position table size (default seq_length)", None, gt=0)
    attention_config: Any = _doc("layer types per layer, NeoX syntax: [[[types...], count|'all'], ...]", None)
    norm: str = _doc("block norm: layernorm | rmsnorm", "layernorm", choices=("layernorm", "rmsnorm"))
    layernorm_epsilon: float = _doc("LayerNorm epsilon", 1e-5, gt=0)
    rms_norm_epsilon: float = _doc("RMSNorm epsilon", 1e-8, gt=0)
    activation: str = _doc("MLP activation, GPT-NeoX's names; the gated ones (geglu, reglu, swiglu, bilinear, glu) "
                           "multiply act(gate) by a second projection", "gelu", choices=ACTIVATIONS)
    intermediate_size: int | None = _doc(
        "GPT-NeoX's MLP size (default 4d); a gated activation takes GPT-NeoX's rule: each of its two projections "
        "is int(intermediate_size * 2/3) // 2 wide, rounded up to mlp_multiple_of (llama-7B: 32768 -> 11008)",
        None, gt=0)
    mlp_multiple_of: int = _doc("round the MLP width up to a multiple of this (GPT-NeoX's rule)", 1, gt=0)
    bias_gelu_fusion: bool = _doc("GELU as GPT-NeoX's fused bias-GELU kernel computes it: the tanh approximation",
                                  False)
    use_bias_in_mlp: bool = _doc("biases in the MLP linear layers (old name: mlp_bias)", True)
    use_bias_in_attn_linear: bool = _doc("biases in attention's QKV/output projections", True)
    use_bias_in_norms: bool = _doc("a bias (shift) in every LayerNorm (RMSNorm has none)", True)
    num_kv_heads: int | None = _doc(
        "key/value heads of attention layers (grouped-query attention; 1 = multi-query; default "
        "num_attention_heads); under TP they are split over ranks, or replicated when fewer than TP ranks", None,
        gt=0)
    attention_type: str | None = _doc("groupedquery (needs num_kv_heads) or multihead", None,
                                      choices=("multihead", "groupedquery"))
    sliding_window_width: int | None = _doc(
        "attention layers see the current and the previous N positions (Mistral; flash-attn's window_size (N, 0))",
        None, gt=0)
    pos_emb: str = _doc("position encoding: rotary | learned | none", "learned", choices=("rotary", "learned", "none"))
    rotary_pct: float = _doc("fraction of each head's channels that rotary rotates", 1.0, ge=0, le=1)
    rotary_emb_base: float = _doc("rotary base", 10000.0, gt=0)
    no_weight_tying: bool = _doc("untie the input embedding and the LM head", False)
    gpt_j_residual: bool = _doc("parallel residual: x + mixer(ln1 x) + mlp(ln2 x)", False)
    init_method: str = _doc(" | ".join(_INIT_METHODS), "normal", choices=_INIT_METHODS)
    output_layer_init_method: str = _doc("init of output projections (same names)", "scaled_normal",
                                         choices=_INIT_METHODS)
    init_method_std: float = _doc("std of the 'normal' init methods", 0.02, gt=0)
    hidden_dropout: float = _doc("dropout on block outputs", 0.0, ge=0, lt=1)
    attention_dropout: float = _doc("dropout on attention probabilities", 0.0, ge=0, lt=1)
    make_vocab_size_divisible_by: int = _doc("pad the vocabulary to a multiple of this x TP", 128, gt=0)
    vocab_size: int | None = _doc("tokenizer vocabulary size; default: read from the tokenizer files", None, gt=0)
    output_layer_parallelism: str = _doc("LM head split; only 'column' (vocab-parallel) is supported", "column",
                                         choices=("column",))
    # ---- parallelism ----
    pipe_parallel_size: int = _doc("pipeline stages; 0 = plain DeepSpeed engine, >=1 = pipeline engine", 0, ge=0)
    model_parallel_size: int = _doc("tensor-parallel size (megatron-core TP)", 1, gt=0)
    pipe_partition_method: str = _doc("DeepSpeed layer partitioning (NeoX's default maps to our blocks)",
                                      "type:ZooBlock", parse=_partition_problem)
    zero_optimization: dict = _doc("DeepSpeed ZeRO section (stage 0-2)", factory=ZERO.normalized, section=ZERO,
                                   null=True)
    # ---- optimisation ----
    optimizer: dict = _doc("{type: Adam|AdamW, params: {lr, betas, eps}}",
                           factory=lambda: OPTIMIZER.normalized({"params": {"lr": 6e-4}}), section=OPTIMIZER)
    weight_decay: float = _doc("AdamW-style decoupled weight decay (not on biases and norms); GPT-NeoX's default",
                               0.1, ge=0)
    min_lr: float = _doc("floor of the LR schedule", 0.0, ge=0)
    warmup: float = _doc("warm-up as a fraction of lr_decay_iters", 0.01, ge=0, le=1)
    lr_decay_style: str = _doc("cosine | linear | constant (GPT-NeoX's default: linear)", "linear",
                               choices=("cosine", "linear", "constant"))
    lr_decay_iters: int | None = _doc("iterations of the decay (default train_iters)", None, gt=0)
    train_iters: int = _doc("optimizer steps", 1000, gt=0)
    train_micro_batch_size_per_gpu: int = _doc("sequences per rank per micro step", 4, gt=0)
    gradient_accumulation_steps: int = _doc("micro steps per optimizer step", 1, gt=0)
    train_batch_size: int | None = _doc("global batch; checked against micro x accumulation x DP", None, gt=0)
    gradient_clipping: float = _doc("global grad-norm clip (0 = off)", 1.0, ge=0, hint="0 turns clipping off")
    fp16: dict = _doc("{enabled: bool, ...}: DeepSpeed fp16 (CUDA only)", factory=FP16.normalized, section=FP16,
                      null=True)
    bf16: dict = _doc("{enabled: bool}: DeepSpeed bf16 (FFTs still run in fp32)", factory=BF16.normalized,
                      section=BF16, null=True)
    data_types: dict | None = _doc("DeepSpeed's data_types section: {grad_accum_dtype: fp32 | bf16 | fp16}", None,
                                   section=DATA_TYPES)
    precision: str | None = _doc("NeoX shorthand: fp32 | fp16 | bfloat16", None, choices=("fp32", "fp16", "bfloat16"),
                                 hint="GPT-NeoX spells bf16 bfloat16")
    seed: int = _doc("random seed", 1234, ge=0, le=2**32 - 1, hint="numpy's seed range; it orders the data")
    # ---- data ----
    data_path: str | None = _doc("one .bin/.idx prefix, split by `split`", None)
    train_data_paths: list | None = _doc("training prefixes (blended by train_data_weights)", None,
                                         items=Rule("str"))
    valid_data_paths: list | None = _doc("validation prefixes", None, items=Rule("str"))
    test_data_paths: list | None = _doc("test prefixes", None, items=Rule("str"))
    train_data_weights: list | None = _doc("blend weights of train_data_paths (default: equal)", None,
                                           items=Rule("float", gt=0))
    valid_data_weights: list | None = _doc("blend weights of valid_data_paths (default: equal)", None,
                                           items=Rule("float", gt=0))
    test_data_weights: list | None = _doc("blend weights of test_data_paths (default: equal)", None,
                                          items=Rule("float", gt=0))
    split: str = _doc("train,valid,test proportions of data_path", "969, 30, 1", parse=_split_problem)
    data_cache_path: str | None = _doc("where megatron-core caches its sample indices", None, writable=True,
                                       parse=_nonempty)
    tokenizer_type: str = _doc("GPT2BPETokenizer | HFTokenizer | SPMTokenizer", "GPT2BPETokenizer",
                               choices=("GPT2BPETokenizer", "HFTokenizer", "SPMTokenizer"))
    vocab_file: str | None = _doc("tokenizer vocabulary / model file", None)
    merge_file: str | None = _doc("GPT-2 merges file", None)
    eod_mask_loss: bool = _doc("mask the loss on end-of-document tokens", False)
    # ---- checkpoints, evaluation, logging ----
    save: str | None = _doc("checkpoint directory", None, writable=True, parse=_nonempty)
    load: str | None = _doc("checkpoint directory to resume from (latest tag)", None)
    no_load_optim: bool = _doc("resume without the optimizer state of `load` (fresh Adam moments)", False)
    no_load_rng: bool = _doc("resume without the random-number state of `load`", False)
    override_lr_scheduler: bool = _doc(
        "resume with the LR schedule of this config (lr, warmup, decay) at the loaded iteration instead of the "
        "checkpoint's schedule state", False)
    use_checkpoint_lr_scheduler: bool = _doc("take the LR schedule from the checkpoint (this stack's default)", False)
    fp32_allreduce: bool = _doc("all-reduce gradients (data parallel) and tensor-parallel partial sums in fp32 "
                                "under bf16/fp16", False)
    finetune: bool = _doc(
        "load only the model weights from `load` and start at iteration 0 with a fresh optimizer and schedule "
        "(GPT-NeoX's meaning); changes that keep every parameter's shape are allowed and listed", False)
    load_fallback: bool = _doc(
        "if the checkpoint `latest` names fails verification, load the newest older one that verifies (said "
        "loudly) instead of stopping", False)
    overwrite_checkpoints: bool = _doc(
        "let a run write into a `save` folder that holds checkpoints it did not load from", False)
    checkpoint_factor: int | None = _doc("save every N iterations", None, gt=0, hint="null: no periodic saves")
    extra_save_iters: list | None = _doc("extra iterations to save at", None, items=Rule("int", ge=0))
    keep_last_n_checkpoints: int | None = _doc("prune older complete checkpoints", None, gt=0,
                                               hint="null keeps every checkpoint")
    checkpoint_activations: bool = _doc("recompute each group of checkpoint_num_layers blocks in backward", False)
    checkpoint_num_layers: int = _doc("blocks per activation-checkpointing group", 1, gt=0)
    lm_head_chunk_tokens: int = _doc(
        "LM head + loss in chunks of this many tokens, recomputed in backward, so the full [tokens, vocab] "
        "logits never exist (0 = whole micro-batch at once)", 0, ge=0, hint="0 = unchunked")
    compile: bool = _doc("torch.compile each block's mixer (measure first: bench.compile)", False)
    fused_norms: bool = _doc("use NVIDIA apex's fused LayerNorm/RMSNorm when apex is installed (CUDA)", True)
    max_nonfinite_steps: int = _doc(
        "steps with non-finite gradients are skipped; after this many in a row the run stops (exit 3)", 5, gt=0)
    eval_interval: int = _doc("validation every N iterations", 1000, gt=0)
    eval_iters: int = _doc("validation batches per evaluation", 10, ge=0, hint="0 = no validation")
    log_interval: int = _doc("log every N iterations", 100, gt=0)
    steps_per_print: int = _doc("DeepSpeed's own print interval", 10, ge=0, hint="0 = never")
    tensorboard_dir: str | None = _doc("tensorboard event directory", None, writable=True, parse=_nonempty)
    log_dir: str | None = _doc("text log directory", None, writable=True, parse=_nonempty)
    ar_eval: dict = _doc(
        "AR-slice evaluation after each checkpoint: {enabled, iters, threshold, bigram_counts, reference, strict, "
        "timeout} (see docs/ar-slice.md)", factory=AR_EVAL.normalized, section=AR_EVAL, null=True)
    eval_tasks: list | None = _doc(
        "lm-evaluation-harness task names (GPT-NeoX's key), run on the weights of every saved checkpoint by "
        "`train.py`: `<checkpoint>/eval_tasks.json` and tensorboard `eval_tasks/<task>/<metric>` (docs/inference.md); "
        "needs the `eval` extra (`pip install '.[eval]'`), else a config error", None,
        items=Rule("str", parse=_task_name_problem))
    eval_tasks_include_path: list | None = _doc(
        "folders of local lm-eval task YAMLs that `eval_tasks` may name (e.g. `[tests/data/lm_eval]`); a launch "
        "refuses a missing folder", None, items=Rule("str", parse=_nonempty))
    eval_tasks_limit: float | None = _doc(
        "documents per `eval_tasks` task (below 1: a fraction of them); 10 as GPT-NeoX's in-training evaluation; "
        "null: every document",
        10, gt=0, hint="null: every document")
    # ---- per-mixer sections (one key per registered layer type) ----
    mixer_sections: dict = _doc("internal: the YAML sections of the layer types", factory=dict)
    # ---- derived (not YAML keys) ----
    layer_types: list = field(default_factory=list)
    padded_vocab_size: int = 0
    world_size: int = 1
    sources: dict = field(default_factory=dict)
    ignored_keys: list = field(default_factory=list)
    config_notes: list = field(default_factory=list)
    """What merging the files replaced and what the checks tolerated; logged at start-up, printed by --dry-run."""

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
        return self.optimizer["params"]["lr"]

    @property
    def gated_mlp(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    @property
    def ffn_hidden_size(self) -> int:
        """GPT-NeoX's MLP size before its gated-activation rule: intermediate_size, default 4d (also the width
        a layer type's own MLP takes, e.g. RWKV's channel mix)."""
        return int(self.intermediate_size) if self.intermediate_size is not None else 4 * self.hidden_size

    @property
    def mlp_widths(self) -> tuple[int, int]:
        """(first projection's output, second projection's input) as GPT-NeoX sizes its MLP: a gated activation
        takes int(size * 2/3) for both halves of the first projection together and half of it for the
        second's input; then the first is rounded up to 2 x mlp_multiple_of, the second to mlp_multiple_of.
        A model is consistent when the first is twice (gated) or equal to (plain) the second."""
        ffn, m = self.ffn_hidden_size, self.mlp_multiple_of
        ffn_in = ffn
        if self.gated_mlp:
            ffn = int(ffn * 2 / 3)
            ffn_in = ffn // 2
        return 2 * m * (-(-ffn // (2 * m))), m * (-(-ffn_in // m))

    @property
    def mlp_width(self) -> int:
        """Width of the block MLP's hidden layer (each projection's, when gated)."""
        return self.mlp_widths[1]

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_attention_heads

    @property
    def dtype_name(self) -> str:
        if self.bf16["enabled"] or self.precision == "bfloat16":
            return "bf16"
        if self.fp16["enabled"] or self.precision == "fp16":
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
        skip = {"mixer_sections", "layer_types", "padded_vocab_size", "world_size", "sources", "ignored_keys",
                "config_notes"}
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        out.update(self.mixer_sections)
        return out


def _field_rule(f: dataclasses.Field) -> Rule:
    """A field's Rule with its kind and nullability taken from the annotation (`int | None` etc.)."""
    rule = f.metadata["rule"]
    parts = [p.strip() for p in str(f.type).split("|")]
    kind = parts[0] if parts[0] in ("int", "float", "bool", "str", "list", "dict") else "any"
    return dataclasses.replace(rule, kind=kind if rule.kind == "any" else rule.kind, null=rule.null or "None" in parts)


ARG_FIELDS = {f.name: f for f in dataclasses.fields(Args) if "doc" in f.metadata and f.name != "mixer_sections"}
ARG_RULES = {name: _field_rule(f) for name, f in ARG_FIELDS.items()}
"""The schema of every top-level key."""

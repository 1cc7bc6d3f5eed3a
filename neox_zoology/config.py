"""GPT-NeoX YAML -> one typed `Args` object: merge, expand, validate, derive.

Rules (GPT-NeoX's, so its configs load unmodified):
- one or several YAML files; keys may use `-` or `_`; a key set in two files is an error naming both;
- `attention_config: [[["baseconv", "attention"], 12]]` expands `[[pattern, count], ...]` into one
  layer type per layer, the pattern repeated over `count` layers; `count: "all"` means num_layers;
- deliberate overrides come after the files: `--override FILE` (may replace keys) and `--set key=value`.

The schema is written once, next to the fields: every `Args` field carries a `Rule` (type from its
annotation, range, choices, nested `Section` of allowed keys) and every nested section (`optimizer`,
`zero_optimization`, `fp16`, `bf16`, `ar_eval`) is a `Section` table of rules with its defaults.
Everything is validated before any process group starts. A problem is reported as one `ConfigError`
line naming the file, key, value and the fix; `train.py` prints it and exits non-zero.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from neox_zoology import registry


MAX_LAYERS = 100_000
"""Sanity bound: the layer pattern is expanded to a list of num_layers entries before anything else."""

MISSING = dataclasses.MISSING


class _Unset:
    """Marks a Rule without a default / without a single implemented value."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset()


class ConfigError(ValueError):
    """A configuration problem, phrased for the user (one line)."""


def normalize_key(key: str) -> str:
    return str(key).replace("-", "_")


def _show(value) -> str:
    """A value as the user wrote it in YAML (strings quoted, so `'false'` is visibly not `false`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _looks_numeric(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


# ---------------------------------------------------------------- the schema


@dataclass(frozen=True)
class Rule:
    """Type and range of one config value.

    kind: int | float | bool | str | list | dict | any (top-level keys take it from their annotation).
    A bool is never a number and a string is never a bool; an int is accepted for a float; numbers
    are finite. `only` is the one value this stack implements (anything else is refused with `hint`
    as the reason); `writable` marks a directory the run writes (checked by `check_paths`).
    """

    kind: str = "any"
    null: bool = False
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple = ()
    casefold: bool = False
    items: Rule | None = None
    length: int | None = None
    section: Section | None = None
    only: Any = UNSET
    default: Any = UNSET
    required: bool = False
    writable: bool = False
    parse: Callable[[Any], str | None] | None = None
    hint: str = ""

    def expect(self) -> str:
        """What a valid value is, as the fix in a message ("a number in [0, 1)")."""
        if self.only is not UNSET:
            text = _show(self.only)
        elif self.choices:
            text = "one of " + ", ".join(map(str, self.choices))
        elif self.kind == "bool":
            text = "true or false (unquoted)"
        elif self.kind in ("int", "float"):
            a_noun = "an integer" if self.kind == "int" else "a number"
            lo, lo_in = (self.ge, True) if self.ge is not None else (self.gt, False)
            hi, hi_in = (self.le, True) if self.le is not None else (self.lt, False)
            if lo is not None and hi is not None:
                text = f"{a_noun} in {'[' if lo_in else '('}{_num(lo)}, {_num(hi)}{']' if hi_in else ')'}"
            elif lo == 0:
                text = f"a {'non-negative' if lo_in else 'positive'} {a_noun.split()[1]}"
            elif lo is not None:
                text = f"{a_noun} {'>=' if lo_in else '>'} {_num(lo)}"
            else:
                text = a_noun
        elif self.kind == "list":
            text = f"a list of {self.length} entries" if self.length else "a list"
            if self.items is not None:
                text += f", each {self.items.expect()}"
        elif self.kind == "dict":
            text = f"a mapping, e.g. {self.section.example}" if self.section else "a mapping"
        elif self.kind == "str":
            text = "a path" if self.writable else "a string"
        else:
            text = "a value"
        return text + (" or null" if self.null and self.only is UNSET else "")

    def fail(self, name: str, value, where: str) -> ConfigError:
        notes = [self.hint] if self.hint else []
        if self.kind in ("int", "float") and isinstance(value, str) and _looks_numeric(value):
            notes.append("YAML read it as text: write numbers unquoted, with a decimal point before an exponent, "
                         "e.g. 6.0e-4")
        hint = f" ({'; '.join(notes)})" if notes else ""
        if self.only is not UNSET:
            return ConfigError(f"{where}: {name}: {_show(value)}; only {_show(self.only)} is supported here{hint}")
        return ConfigError(f"{where}: {name}: {_show(value)}; use {self.expect()}{hint}")

    def check(self, value, name: str, where: str):
        """The value, type-checked, range-checked and normalised (int -> float, section defaults filled)."""
        if value is None:
            if self.section is not None and self.null:
                return self.section.check({}, name, where)
            if self.null or self.kind == "any":
                return None
            raise self.fail(name, value, where)
        kind = self.kind
        if kind == "bool" and not isinstance(value, bool):
            raise self.fail(name, value, where)
        if kind in ("int", "float"):
            if isinstance(value, bool) or not isinstance(value, int if kind == "int" else (int, float)):
                raise self.fail(name, value, where)
            if isinstance(value, float) and not math.isfinite(value):
                raise self.fail(name, value, where)
            value = float(value) if kind == "float" else value
            if ((self.ge is not None and value < self.ge) or (self.gt is not None and value <= self.gt)
                    or (self.le is not None and value > self.le) or (self.lt is not None and value >= self.lt)):
                raise self.fail(name, value, where)
        if kind == "str" and not isinstance(value, str):
            raise self.fail(name, value, where)
        if kind == "list":
            if not isinstance(value, (list, tuple)) or (self.length is not None and len(value) != self.length):
                raise self.fail(name, value, where)
            if self.items is not None:
                value = [self.items.check(v, f"{name}[{i}]", where) for i, v in enumerate(value)]
            else:
                value = list(value)
        if kind == "dict":
            if not isinstance(value, dict):
                raise self.fail(name, value, where)
            if self.section is not None:
                value = self.section.check(value, name, where)
        if self.choices:
            match = [c for c in self.choices
                     if c == value or (self.casefold and isinstance(value, str) and c.lower() == value.lower())]
            if not match:
                close = difflib.get_close_matches(str(value), [str(c) for c in self.choices], n=1)
                did = f" (did you mean {close[0]}?)" if close else ""
                hint = f" ({self.hint})" if self.hint else ""
                raise ConfigError(f"{where}: {name}: {_show(value)} is not supported{did}; use one of "
                                  f"{', '.join(map(str, self.choices))}{hint}")
            value = match[0]
        if self.only is not UNSET and value != self.only:
            raise self.fail(name, value, where)
        if self.parse is not None:
            problem = self.parse(value)
            if problem:
                raise ConfigError(f"{where}: {name}: {_show(value)}; {problem}")
        return value


@dataclass(frozen=True)
class Section:
    """The allowed keys of a nested mapping, each with its `Rule` (and default, where it has one).

    A key with no default stays absent (the consumer's own default applies, e.g. DeepSpeed's).
    `refused` keys are GPT-NeoX/DeepSpeed keys this stack does not implement, with the reason;
    `not_forwarded` keys (GPT-NeoX's own markers, switches accepted only where they do nothing) are not
    passed on to DeepSpeed.
    """

    name: str
    keys: dict
    example: str
    refused: dict = field(default_factory=dict)
    not_forwarded: frozenset = frozenset()

    def check(self, value: dict, name: str, where: str) -> dict:
        out = {}
        for raw_key, v in value.items():
            key = normalize_key(raw_key)
            if key in self.refused:
                raise ConfigError(f"{where}: {name}.{key}: {_show(v)}; {self.refused[key]}")
            if key not in self.keys:
                close = difflib.get_close_matches(key, list(self.keys), n=1)
                did = f"; did you mean {close[0]}?" if close else ""
                raise ConfigError(f"{where}: {name}.{key}: unknown key{did} (valid: {', '.join(self.keys)})")
            out[key] = self.keys[key].check(v, f"{name}.{key}", where)
        for key, rule in self.keys.items():
            if key in out:
                continue
            if rule.required:
                hint = f" ({rule.hint})" if rule.hint else ""
                raise ConfigError(f"{where}: {name}.{key} is missing; set it to {rule.expect()}{hint}")
            if rule.default is not UNSET:
                out[key] = copy.deepcopy(rule.default)
        return out

    def normalized(self, value: dict | None = None) -> dict:
        """A valid section with its defaults filled (for `Args` defaults)."""
        return self.check(value or {}, self.name, "defaults")

    def for_deepspeed(self, value: dict) -> dict:
        """The section as DeepSpeed's config takes it (without the `not_forwarded` keys)."""
        return {k: v for k, v in value.items() if k not in self.not_forwarded}


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


def _even(n: int) -> str | None:
    # DeepSpeed's ZeRO 1/2 asserts a multiple of its 2-element (4-byte) allgather alignment.
    return None if n % 2 == 0 else "use an even number of elements (DeepSpeed's ZeRO aligns allgathers to 2)"


def _nonempty(text: str) -> str | None:
    return None if text.strip() else "give a directory (or null for none)"


_OFFLOAD_WHY = ("ZeRO-Offload steps DeepSpeed's CPU Adam in place of this stack's torch AdamW, and DeepSpeed "
                "refuses the pair; remove the key or turn it off")


def _no_offload(section: dict) -> str | None:
    device = section.get("device", "none")
    return None if device in ("none", None) else _OFFLOAD_WHY


OPTIMIZER_PARAMS = Section(
    "optimizer.params",
    {
        "lr": Rule("float", gt=0, required=True, hint="the peak learning rate"),
        "betas": Rule("list", length=2, items=Rule("float", ge=0, lt=1), default=[0.9, 0.999]),
        "eps": Rule("float", gt=0, default=1e-8),
        # FusedAdam arguments GPT-NeoX passes through; accepted at the value this stack computes.
        "adam_w_mode": Rule("bool", only=True, hint="weight decay is decoupled (AdamW), as GPT-NeoX's default"),
        "bias_correction": Rule("bool", only=True, hint="Adam's bias correction is always applied"),
        "amsgrad": Rule("bool", only=False, hint="GPT-NeoX's FusedAdam has no AMSGrad either"),
    },
    example="{lr: 6.0e-4, betas: [0.9, 0.95], eps: 1.0e-8}",
    refused={
        "weight_decay": "GPT-NeoX takes weight decay only from the top-level key weight_decay (it passes that "
                        "to the optimizer beside these params, which refuses a second one); set weight_decay "
                        "there and remove this one",
    },
)
OPTIMIZER = Section(
    "optimizer",
    {
        "type": Rule("str", choices=("Adam", "AdamW"), casefold=True, default="Adam",
                     hint="both are Adam with decoupled weight decay, GPT-NeoX's Adam"),
        "params": Rule("dict", section=OPTIMIZER_PARAMS, required=True),
    },
    example="{type: Adam, params: {lr: 6.0e-4, betas: [0.9, 0.95], eps: 1.0e-8}}",
)
_STAGE3 = ("sub_group_size", "prefetch_bucket_size", "param_persistence_threshold", "model_persistence_threshold",
           "max_live_parameters", "max_reuse_distance", "gather_16bit_weights_on_model_save",
           "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "stage3_model_persistence_threshold",
           "stage3_max_live_parameters", "stage3_max_reuse_distance", "stage3_gather_16bit_weights_on_model_save",
           "stage3_gather_fp16_weights_on_model_save")
ZERO = Section(
    "zero_optimization",
    {
        "stage": Rule("int", ge=0, le=2, default=0,
                      hint="ZeRO-3 is not supported; tensor and pipeline parallelism split the parameters"),
        "allgather_partitions": Rule("bool"),
        "allgather_bucket_size": Rule("int", gt=0, parse=_even),
        "overlap_comm": Rule("bool"),
        "reduce_scatter": Rule("bool"),
        "reduce_bucket_size": Rule("int", gt=0),
        "contiguous_gradients": Rule("bool"),
        "round_robin_gradients": Rule("bool"),
        "load_from_fp32_weights": Rule("bool"),
        "cpu_offload": Rule("bool", only=False, hint=_OFFLOAD_WHY),
        "offload_optimizer": Rule("dict", null=True, parse=_no_offload),
        "offload_param": Rule("dict", null=True, parse=_no_offload),
    },
    example="{stage: 1, overlap_comm: true, contiguous_gradients: true}",
    refused={**{k: "a ZeRO stage-3 setting; this stack supports stages 0-2" for k in _STAGE3},
             "cpu_offload_param": _OFFLOAD_WHY, "cpu_offload_use_pin_memory": _OFFLOAD_WHY},
    # DeepSpeed refuses its deprecated cpu_offload beside offload_optimizer, even when false
    not_forwarded=frozenset({"cpu_offload"}),
)
FP16 = Section(
    "fp16",
    {
        "enabled": Rule("bool", default=False),
        "auto_cast": Rule("bool"),
        "loss_scale": Rule("float", ge=0, hint="0 = dynamic loss scaling"),
        "initial_scale_power": Rule("int", ge=0, le=64),
        "loss_scale_window": Rule("int", gt=0),
        "hysteresis": Rule("int", gt=0),
        "consecutive_hysteresis": Rule("bool"),
        "min_loss_scale": Rule("int", gt=0),
        "fp16": Rule("bool", hint="GPT-NeoX's own marker"),
        "type": Rule("str", choices=("fp16", "bfloat16"),
                     hint="GPT-NeoX's own marker; bfloat16 with enabled: true means bf16"),
    },
    example="{enabled: true, loss_scale: 0, loss_scale_window: 1000, hysteresis: 2, min_loss_scale: 1}",
    refused={"fp16_master_weights_and_grads": "needs DeepSpeed's CPU Adam; this stack steps a torch AdamW"},
    not_forwarded=frozenset({"fp16", "type"}),
)
DATA_TYPES = Section(
    "data_types",
    {"grad_accum_dtype": Rule("str", choices=("fp32", "bf16", "fp16"),
                              hint="the dtype DeepSpeed accumulates gradients in")},
    example="{grad_accum_dtype: fp32}",
)
BF16 = Section(
    "bf16",
    {
        "enabled": Rule("bool", default=False),
        "immediate_grad_update": Rule("bool"),
        "check_grad_overflow": Rule("bool"),
    },
    example="{enabled: true}",
)
AR_EVAL = Section(
    "ar_eval",
    {
        "enabled": Rule("bool", default=False),
        "iters": Rule("int", gt=0, default=10, hint="global validation batches per evaluation"),
        "threshold": Rule("int", ge=0, default=1250,
                          hint="an AR hit's bigram occurred at most this many times in training"),
        "bigram_counts": Rule("str", null=True, default=None, hint=".npz of training bigram counts"),
        "reference": Rule("str", null=True, default=None,
                          hint="ar_slice.json or run directory of an attention run, for gap attribution"),
        "strict": Rule("bool", default=False, hint="true: a failure inside the evaluation stops training"),
        "timeout": Rule("float", gt=0, null=True, default=1800.0,
                        hint="seconds; the evaluation stops early (results marked truncated) after this"),
    },
    example="{enabled: true, bigram_counts: data/bigrams.npz}",
)
AR_EVAL_DEFAULTS = AR_EVAL.normalized()


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
    init_method: str = _doc("normal | scaled_normal | small_init | wang_init", "normal", choices=_INIT_METHODS)
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
        "timeout} (see README 'AR-slice evaluation')", factory=AR_EVAL.normalized, section=AR_EVAL, null=True)
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


def _field_rule(f: dataclasses.Field) -> Rule:
    """A field's Rule with its kind and nullability taken from the annotation (`int | None` etc.)."""
    rule = f.metadata["rule"]
    parts = [p.strip() for p in str(f.type).split("|")]
    kind = parts[0] if parts[0] in ("int", "float", "bool", "str", "list", "dict") else "any"
    return dataclasses.replace(rule, kind=kind if rule.kind == "any" else rule.kind, null=rule.null or "None" in parts)


ARG_FIELDS = {f.name: f for f in dataclasses.fields(Args) if "doc" in f.metadata and f.name != "mixer_sections"}
ARG_RULES = {name: _field_rule(f) for name, f in ARG_FIELDS.items()}
"""The schema of every top-level key."""

# GPT-NeoX keys accepted for compatibility that change nothing in this stack (kernel-fusion switches,
# launcher/logging settings handled elsewhere, features of other model families). Logged once.
NEOX_NO_EFFECT = {
    "scaled_upper_triang_masked_softmax_fusion", "scaled_masked_softmax_fusion",
    "bias_dropout_fusion", "rope_fusion", "layernorm_fusion", "rmsnorm_fusion", "use_flashattn_swiglu",
    "use_bnb_optimizer",
    "partition_activations", "synchronize_each_layer", "contiguous_checkpointing",
    "checkpoint_in_cpu", "wall_clock_breakdown",
    "distributed_backend", "hostfile", "include", "exclude", "num_gpus", "num_nodes", "master_port",
    "master_addr", "launcher", "deepspeed_mpi", "deepspeed_slurm", "data_impl", "num_workers",
    "mmap_warmup", "checkpoint_validation_with_forward_pass", "use_wandb", "wandb_project",
    "wandb_group", "wandb_team", "wandb_host", "wandb_init_all_ranks", "git_hash", "log_grad_norm",
    "log_grad_pct_zeros", "log_param_norm", "log_optimizer_states", "log_gradient_noise_scale",
    "gradient_noise_scale_n_batches", "gradient_noise_scale_cpu_offload", "dump_state",
    "memory_profiling", "memory_profiling_path", "profile", "profile_step_start", "profile_step_stop",
    "short_seq_prob", "eval_tasks", "sparsity_config", "opt_pos_emb_offset",
    "apply_query_key_layer_scaling", "attention_softmax_in_fp32", "rpe_num_buckets", "rpe_max_distance",
    "gmlp_attn_dim", "adlr_autoresume", "adlr_autoresume_interval", "onnx_safe", "comment",
    "no_save_optim", "no_save_rng", "zero_stage",
    "zero_reduce_scatter", "zero_contiguous_gradients", "zero_reduce_bucket_size",
    "zero_allgather_bucket_size", "amp", "autotuning", "flops_profiler", "comms_logger",
    "sequence_parallel", "curriculum_learning", "loss_scale", "loss_scale_window",
    "hysteresis", "min_loss_scale", "initial_loss_scale", "prescale_gradients", "gradient_predivide_factor",
    "tensorboard", "wandb", "csv_monitor", "elasticity", "data_efficiency", "weight_by_num_documents",
    "weighted_sampler_alpha", "global_num_gpus", "use_comet", "comet_workspace", "comet_project",
    "comet_experiment_name", "comet_tags", "comet_others", "wandb_run_name", "log_gradient_noise_scale",
    # text generation (GPT-NeoX's generate.py), not training
    "text_gen_type", "maximum_tokens", "prompt_end", "temperature", "top_p", "top_k", "recompute",
    "sample_input_file", "sample_output_file", "num_samples",
}


def _off(v) -> bool:
    """A DeepSpeed feature section that is absent or disabled."""
    return not v or (isinstance(v, dict) and v.get("enabled") is False)


# GPT-NeoX keys that have no effect here only at their GPT-NeoX default; any other value would change the
# numbers, so it is refused with the reason.
NEOX_NO_EFFECT_ONLY_AT_DEFAULT = {
    "weight_by_num_documents": (lambda v: v in (None, False),
                                "weighting datasets by document count is not implemented; give train_data_weights"),
    "prescale_gradients": (lambda v: v in (None, False), "DeepSpeed's gradient prescaling is not passed on here"),
    "gradient_predivide_factor": (lambda v: v is None or (not isinstance(v, bool) and v == 1),
                                  "DeepSpeed's gradient pre-division is not passed on here"),
    "opt_pos_emb_offset": (lambda v: v is None or (not isinstance(v, bool) and v == 0),
                           "OPT's learned-position offset is not implemented"),
    "curriculum_learning": (_off, "DeepSpeed's curriculum learning is not implemented here"),
    "data_efficiency": (_off, "DeepSpeed's data efficiency sampling is not implemented here"),
    "amp": (_off, "apex AMP is not implemented here (use bf16)"),
    "elasticity": (_off, "DeepSpeed's elastic batch sizing is not implemented here"),
    "autotuning": (_off, "DeepSpeed's autotuning is not implemented here"),
    "use_bnb_optimizer": (lambda v: v in (None, False),
                          "bitsandbytes' 8-bit Adam is not implemented here (its states are quantised, so the "
                          "steps differ from 32-bit Adam); set it to false"),
    "sparsity_config": (lambda v: not v,
                        "DeepSpeed's block-sparse attention (triton, CUDA only) is not implemented here; remove "
                        "it (for a sliding window use sliding_window_width)"),
}

# GPT-NeoX keys of features this stack does not build, with the reason and what to do (one refusal per key).
_DS_LOGGING = frozenset({"comms_logger", "flops_profiler", "wall_clock_breakdown", "tensorboard", "wandb",
                         "csv_monitor", "steps_per_print", "dump_state"})
_MOE = "mixture-of-experts layers are not implemented here; remove the moe_* keys for a dense model"
_TE = "Transformer Engine layers are not implemented here; remove the te_* keys (the plain layers compute the same)"
NEOX_REFUSED = {
    **{k: _MOE for k in ("moe_num_experts", "moe_type", "moe_top_k", "moe_router_type", "moe_lbl_in_fp32",
                         "moe_jitter_eps", "moe_aux_loss_coeff", "moe_z_loss_coeff", "moe_min_capacity",
                         "moe_token_dropping", "moe_train_capacity_factor", "moe_eval_capacity_factor",
                         "enable_expert_tensor_parallelism", "moe_expert_parallel_size", "moe_use_residual",
                         "moe_glu", "moe_ffn_hidden_size")},
    **{k: _TE for k in ("te_columnparallel", "te_rowparallel", "te_layernorm_mlp", "te_mha", "te_fp8_format",
                        "te_fp8_wgrad", "te_fp8_amax_history_len", "te_fp8_amax_compute_algo", "te_fp8_margin",
                        "te_fp8_mha", "te_fp8_use_cached_weights")},
    "expansion_factor": "GPT-NeoX's expansion_factor is not implemented here; give intermediate_size instead",
    "use_qk_layernorm": "query/key LayerNorm is not implemented here; remove it (or set false)",
    "deepspeed_extra_args": "extra DeepSpeed settings are not passed on here (only its logging sections are "
                            "accepted: " + ", ".join(sorted(_DS_LOGGING)) + "); move each into its own key, or "
                            "remove them",
    "soft_prompt_tuning": "soft-prompt tuning is not implemented here; remove it",
    "scalenorm_epsilon": "ScaleNorm is not implemented here; remove it",
    "output_layer_init_method_std": "remove it; init_method_std applies to every layer",
}

# Layer-type names of GPT-NeoX's attention_config that mean a different model than any type here.
NEOX_LAYER_TYPES = {
    "local": "GPT-NeoX's local is DeepSpeed's block-sparse local attention (sparsity_config), not implemented "
             "here; for a sliding window write sliding_window (or attention with sliding_window_width)",
    **{t: "DeepSpeed's block-sparse attention (sparsity_config) is not implemented here; use global or flash"
       for t in ("sparse_fixed", "sparse_variable", "bigbird", "bslongformer")},
    "gmlp": "gMLP blocks are not implemented here", "amlp": "aMLP blocks are not implemented here",
}

# NeoX values that mean the same as ours.
_NEOX_PARTITION_DEFAULTS = {"type:transformer", "type:transformer|mlp", "type:ParallelTransformerLayerPipe"}


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


KEY_GROUPS: dict[str, tuple[str, ...]] = {  # ar_eval's bigram counts are counts of the training data
    "data": ("data_path", "train_data_paths", "valid_data_paths", "test_data_paths", "train_data_weights",
             "valid_data_weights", "test_data_weights", "split", "data_impl", "ar_eval"),
    "tokenizer": ("tokenizer_type", "vocab_file", "merge_file"),
}
"""Keys that only mean something together. A later file (config or --override) that sets any key of a group
replaces that group of the earlier files as a whole, so a paper config (which names the Pile) combines with
a data config as GPT-NeoX users write them; --set replaces one key."""

REPLACEABLE_KEYS = ("save", "load", "checkpoint_factor", "tensorboard_dir", "log_dir")
"""Where a run writes: a later config file replaces each of these keys one by one (a data config may name its
own folders). Every other key set in two config files is an error."""


class Sources(dict):
    """key -> where its value came from; `notes` says which groups a later file replaced."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.notes: list[str] = []


def _group_of(key: str) -> str | None:
    return next((g for g, keys in KEY_GROUPS.items() if key in keys), None)


def _replace_groups(merged: dict, source: Sources, new: dict, path: str) -> None:
    """Drop the earlier values of every key group `new` (one file's keys) touches, noting what was replaced."""
    for group in dict.fromkeys(g for g in map(_group_of, new) if g):
        old = [k for k in KEY_GROUPS[group] if k in merged]
        if not old:
            continue
        froms = sorted({source[k] for k in old})
        source.notes.append(f"{path} replaces the {group} keys of {', '.join(froms)} ({', '.join(old)})")
        for k in old:
            del merged[k], source[k]


def merge_files(paths, overrides=(), sets=()) -> tuple[dict, Sources]:
    """Merged raw values and, per key, the file it came from (see KEY_GROUPS for what a later file replaces)."""
    merged: dict = {}
    source = Sources()
    for p in paths:
        values = read_yaml(p)
        _replace_groups(merged, source, values, str(p))
        replaced = [k for k in values if k in merged and k in REPLACEABLE_KEYS]
        if replaced:
            source.notes.append(f"{p} replaces {', '.join(f'{k} of {source[k]}' for k in replaced)}")
        for k, v in values.items():
            if k in merged and k not in REPLACEABLE_KEYS:
                raise ConfigError(
                    f"key '{k}' is set in both {source[k]} and {p}; set it in one file "
                    f"(or replace it deliberately with --override FILE / --set {k}=VALUE)"
                )
            merged[k], source[k] = v, str(p)
    for p in overrides:
        values = read_yaml(p)
        _replace_groups(merged, source, values, f"{p} (override)")
        for k, v in values.items():
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
        from neox_zoology import registry

        return [registry.DEFAULT_TYPE] * num_layers
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
    close = difflib.get_close_matches(key, sorted(candidates), n=3, cutoff=0.8)
    return f"; did you mean {', '.join(close)}?" if close else f"; see {KEYS_DOC} for the keys this stack accepts"


KEYS_DOC = "docs/config-keys.md"
"""Where every accepted, ignored and refused key is listed (errors point here)."""


def _neox_inert(key: str, value, raw: dict) -> bool:
    """A refused GPT-NeoX feature key whose value switches the feature off (so it changes nothing)."""
    if key.startswith("moe_") or key == "enable_expert_tensor_parallelism":
        return raw.get("moe_num_experts") in (None, 1) and (key != "moe_num_experts" or value in (None, 1))
    if key == "deepspeed_extra_args" and isinstance(value, dict):
        return set(map(normalize_key, value)) <= _DS_LOGGING
    return value is None or value is False or value == {} or value == []


# GPT-NeoX's mamba_* keys. The kernel switches choose CUDA kernels for the same math: accepted, no effect.
NEOX_MAMBA_FUSION = ("mamba_selective_scan_fusion", "mamba_causal_conv_fusion", "mamba_inner_func_fusion")


def _neox_mamba_keys(raw: dict, where, ignored: list) -> list[str]:
    """Moves GPT-NeoX's mamba_* keys out of `raw`: bias switches into the layer type's section, kernel switches and
    mamba_selective_fp32_params (where it changes nothing) into `ignored`; returns the problems."""
    problems = []
    for key in NEOX_MAMBA_FUSION:
        if key in raw:
            value = raw.pop(key)
            if isinstance(value, bool):
                ignored.append(key)
            else:
                problems.append(f"{where(key)}: {key}: {_show(value)}; use true or false (a kernel choice, no effect)")
    for name in registry.names():  # bias switches: keys of a layer type's section (MixerSpec.neox_keys)
        for key, targets in registry.get(name).neox_keys.items():
            if key not in raw:
                continue
            value, section = raw.pop(key), raw.get(name)
            if not isinstance(value, bool):
                problems.append(f"{where(key)}: {key}: {_show(value)}; use true or false")
                continue
            section = {} if section is None else section
            if not isinstance(section, dict):
                continue  # the section's own error is reported where it is read
            clash = [t for t in targets if t in section and section[t] != value]
            if clash:
                problems.append(f"{where(key)}: {key}: {_show(value)} contradicts {name}.{clash[0]}: "
                                f"{_show(section[clash[0]])}; keep one")
            raw[name] = {**section, **{t: value for t in targets}}
    if "mamba_selective_fp32_params" in raw:
        key, value = "mamba_selective_fp32_params", raw.pop("mamba_selective_fp32_params")
        half = raw.get("precision") in ("fp16", "bfloat16") or any(
            isinstance(raw.get(k), dict) and raw[k].get("enabled") for k in ("fp16", "bf16"))
        if not isinstance(value, bool):
            problems.append(f"{where(key)}: {key}: {_show(value)}; use true or false")
        elif value and half:
            problems.append(f"{where(key)}: {key}: true; keeping A_log and D in fp32 while DeepSpeed casts the model "
                            f"to fp16/bf16 is not implemented here; set it to false (they are then stored in the "
                            f"run's precision, the scan still computes in fp32) or train in fp32")
        else:
            ignored.append(key)  # false, or an fp32 run: every parameter is fp32 anyway
    return problems


def build_args(raw: dict, source: dict | None = None, world_size: int | None = None) -> Args:
    """Typed, validated Args from merged raw keys (no I/O besides tokenizer/data existence checks).

    Every key is checked before anything is raised: one ConfigError lists all problems of the keys, one per
    line; relations between keys are checked only once every key is valid."""
    source = source or {}
    where = lambda k: source.get(k, "config")  # noqa: E731
    args = Args()
    registered = set(registry.names(include_aliases=True))
    problems: list[str] = []
    raw = dict(raw)
    if "mlp_bias" in raw:  # this stack's older name of use_bias_in_mlp
        if "use_bias_in_mlp" in raw and raw["use_bias_in_mlp"] != raw["mlp_bias"]:
            problems.append(f"{where('mlp_bias')}: mlp_bias and use_bias_in_mlp disagree; keep use_bias_in_mlp")
        raw.setdefault("use_bias_in_mlp", raw["mlp_bias"])
        source.setdefault("use_bias_in_mlp", source.get("mlp_bias", "config"))
        del raw["mlp_bias"]
    problems += _neox_mamba_keys(raw, where, args.ignored_keys)
    for key, value in raw.items():
        try:
            if key in ARG_RULES:
                setattr(args, key, ARG_RULES[key].check(value, key, where(key)))
            elif key in registered:
                canon = registry.canonical(key)
                if not isinstance(value, dict):
                    raise ConfigError(f"{where(key)}: {key}: expected a mapping of {canon} arguments, got {value!r}")
                try:
                    registry.resolve_args(canon, value)
                except KeyError as exc:
                    raise ConfigError(f"{where(key)}: {key}: {exc.args[0]}") from None
                args.mixer_sections[canon] = {normalize_key(k): v for k, v in value.items()}
            elif key in NEOX_REFUSED:
                if not _neox_inert(key, value, raw):
                    raise ConfigError(f"{where(key)}: {key}: {_show(value)}; {NEOX_REFUSED[key]}")
                args.ignored_keys.append(key)
            elif key in NEOX_NO_EFFECT:
                no_effect, why = NEOX_NO_EFFECT_ONLY_AT_DEFAULT.get(key, (None, ""))
                if no_effect is not None and not no_effect(value):
                    raise ConfigError(f"{where(key)}: {key}: {_show(value)}; {why} (this GPT-NeoX key is accepted "
                                      f"only at its default)")
                args.ignored_keys.append(key)
            else:
                known = set(ARG_FIELDS) | registered | NEOX_NO_EFFECT | set(NEOX_REFUSED)
                raise ConfigError(f"{where(key)}: unknown key '{key}'{_suggest(key, known)}")
        except ConfigError as exc:
            problems.append(str(exc))
    types = None
    try:
        types = expand_attention_config(args.attention_config, args.num_layers,
                                        f"{where('attention_config')}: attention_config")
    except ConfigError as exc:
        problems.append(str(exc))
    if types is not None:
        for name in sorted(set(types)):
            why = NEOX_LAYER_TYPES.get(name) or registry.config_refusal(name)
            if why:
                problems.append(f"{where('attention_config')}: attention_config: layer type '{name}': {why}")
                continue
            try:
                registry.canonical(name)
            except KeyError as exc:
                problems.append(f"{where('attention_config')}: attention_config: {exc.args[0]}")
    if problems:
        raise ConfigError("\n".join(problems))
    args.layer_types = [registry.canonical(t) for t in types]
    args.sources = dict(source)
    args.config_notes = list(getattr(source, "notes", []))
    args.world_size = int(world_size or os.environ.get("WORLD_SIZE", 1))
    if args.pipe_partition_method in _NEOX_PARTITION_DEFAULTS:
        args.pipe_partition_method = "type:ZooBlock"
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    _neox_precision(args, where)
    _validate(args, where)
    return args


def _neox_precision(args: Args, where) -> None:
    """GPT-NeoX's `fp16: {type: bfloat16, enabled: true}` (Pythia 1B) means bf16."""
    if args.fp16.get("type") == "bfloat16":
        enabled = args.fp16["enabled"]
        args.fp16 = FP16.normalized({"enabled": False})
        if enabled:
            args.bf16 = {**args.bf16, "enabled": True}


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


_DATA_LISTS = (("train_data_paths", "train_data_weights"), ("valid_data_paths", "valid_data_weights"),
               ("test_data_paths", "test_data_weights"))


def _validate(args: Args, where) -> None:
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
    lists = [paths for paths, _ in _DATA_LISTS if getattr(args, paths) is not None]
    if args.data_path is not None and lists:
        raise ConfigError(
            f"{where(lists[0])}: {lists[0]} and data_path are both set; give either data_path (split by `split`) or "
            f"train/valid/test_data_paths, not both"
        )
    if lists and args.train_data_paths is None:
        raise ConfigError(f"{where(lists[0])}: {lists[0]} is set but train_data_paths is not; give the training "
                          f"prefixes in train_data_paths")
    for paths_key, weights_key in _DATA_LISTS:
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
    # per-mixer arguments at this shape
    shape = args.shape()
    for t in sorted(set(args.layer_types)):
        spec = registry.get(t)
        problems = spec.validate(shape, args.mixer_args(t))
        if problems:
            raise ConfigError(f"{where(t)}: {problems[0]}")
        for occ in range(args.layer_types.count(t)):
            spec.per_layer(args.mixer_args(t), occ)  # the per-layer arguments of valid sections build


def check_launch(args: Args) -> None:
    """What only a real run needs (a dry run plans on the meta device): fp16 needs CUDA."""
    if args.dtype_name == "fp16" and not _cuda_available():
        raise ConfigError(
            f"{args.sources.get('fp16', args.sources.get('precision', 'config'))}: fp16 needs CUDA (DeepSpeed has no "
            f"fp16 on CPU); run with --override configs/neox/neox_cpu_override.yml (fp32) or set bf16 on this machine"
        )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


MODEL_KEYS = ("num_layers", "hidden_size", "num_attention_heads")


def check_model_keys(raw: dict, paths) -> None:
    """GPT-NeoX refuses a run without the model's shape; so does this stack (instead of a default model)."""
    if not any(k in raw for k in MODEL_KEYS):
        raise ConfigError(f"{', '.join(map(str, paths))}: no model keys ({', '.join(MODEL_KEYS)}); add a model config "
                          f"file before this one, e.g. train.py configs/neox/baseconv_360m.yml {paths[-1]}")


def writable_problem(path: str) -> str | None:
    """Why the directory `path` cannot be written, or None: it is a writable directory, or the nearest
    existing ancestor is one (so it can be created). Nothing is created."""
    p = Path(path).absolute()
    try:
        if p.exists():
            if not p.is_dir():
                return f"{p} exists and is not a directory"
            return None if os.access(p, os.W_OK | os.X_OK) else f"directory {p} is not writable"
        ancestor = p.parent
        while not ancestor.exists():
            ancestor = ancestor.parent
    except OSError as exc:
        return f"{p} cannot be checked ({exc.strerror or exc})"
    if not ancestor.is_dir():
        return f"{ancestor} is a file, so {p} cannot be created"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{ancestor} is not writable, so {p} cannot be created"
    return None


def missing_data_fix(args: Args, prefix: str) -> str:
    """How to get a missing dataset: the preprocessing command that writes `prefix` with the run's tokenizer,
    or how to point the run at other data."""
    out = prefix[: -len("_text_document")] if prefix.endswith("_text_document") else prefix
    tok = f"--tokenizer-type {args.tokenizer_type}"
    tok += f" --vocab-file {args.vocab_file}" if args.vocab_file else ""
    tok += f" --merge-file {args.merge_file}" if args.merge_file else ""
    return (f"preprocess it there (python -m tokenization.preprocess --input JSONL_FILES --output-prefix {out} "
            f"{tok} --append-eod; README 'Training on the Pile'), or train on other data by adding a data config "
            f"after this one (data_path or train_data_paths; it replaces these data keys)")


def check_paths(args: Args, need_data: bool = True) -> None:
    """Before anything starts: tokenizer files exist, the directories the run writes can be written and, for
    training (the dry run skips data), every data prefix is a whole .bin/.idx pair that `split` divides."""
    for key in ("vocab_file", "merge_file"):
        p = getattr(args, key)
        if p and not Path(p).exists():
            if not need_data and args.vocab_size is not None:  # a dry run plans from vocab_size
                args.config_notes.append(f"{key}: {p} not found; the plan uses vocab_size {args.vocab_size} "
                                         f"(a launch needs the file)")
                continue
            raise ConfigError(f"{args.sources.get(key, 'config')}: {key}: file {p} not found; put the tokenizer "
                              f"file there (README 'Training on the Pile' for GPT-2's) or fix the path")
    for key, rule in ARG_RULES.items():
        if rule.writable and getattr(args, key):
            problem = writable_problem(getattr(args, key))
            if problem:
                raise ConfigError(f"{args.sources.get(key, 'config')}: {key}: {problem}; give a directory this user "
                                  f"can write")
    problem = ar_eval_file_problem(args)  # its bigram counts are made from the data: checked after it
    if not need_data:
        if problem:
            args.config_notes.append(f"{problem.split(';')[0]} (a launch needs it)")
        return
    prefixes = []
    if args.data_path:
        prefixes.append(("data_path", args.data_path))
    for key, _ in _DATA_LISTS:
        prefixes += [(key, p) for p in getattr(args, key) or []]
    if not prefixes:
        raise ConfigError("no training data: set data_path (one .bin/.idx prefix) or train_data_paths")
    from neox_zoology.data import check_indexed_dataset, check_split

    for key, prefix in prefixes:
        for ext in (".bin", ".idx"):
            if not Path(prefix + ext).exists():
                raise ConfigError(f"{args.sources.get(key, 'config')}: {key}: {prefix}{ext} not found; "
                                  f"{missing_data_fix(args, prefix)}")
        check_indexed_dataset(prefix)  # whole and consistent, before any process starts
    if args.data_path:
        check_split(args)  # no used part of the split is empty
    if problem:
        raise ConfigError(f"{args.sources.get('ar_eval', 'config')}: {problem}")


def pad_vocab(vocab_size: int, multiple: int, tp: int) -> int:
    m = multiple * tp
    return int(math.ceil(vocab_size / m) * m)


def load(paths, overrides=(), sets=(), world_size: int | None = None) -> Args:
    raw, source = merge_files(paths, overrides, sets)
    return build_args(raw, source, world_size)

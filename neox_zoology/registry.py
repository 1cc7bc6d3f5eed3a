"""The one registry: layer-type name -> MixerSpec.

Nothing else in the project branches on a layer-type string. Config validation, model assembly,
FLOPs accounting, the single-process door and the docs all ask this table.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class Shape:
    """What a mixer may know about the model it sits in (for validation and FLOPs)."""

    hidden_size: int
    seq_length: int
    num_attention_heads: int
    tp: int = 1
    num_layers: int = 1


@dataclass(frozen=True)
class MixerSpec:
    name: str
    module: type
    """megatron-core `self_attention`-style module: (config, layer_number, **kwargs); [s, b, h] -> (out, bias)."""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    """The keys of this type's YAML section (e.g. `baseconv: {kernel_sizes: [3, -1]}`) and their defaults."""
    tp_split: str = "channels"
    """How the mixer splits under tensor parallelism: 'heads' or 'channels'."""
    tp_note: str = ""
    """What the split means in detail where 'heads' / 'channels' does not say it all (the layer table)."""
    flops: Callable[[Shape, Mapping[str, Any]], float] = lambda shape, args: 0.0
    """Forward FLOPs per token of the mixer (matmuls and FFTs; see neox_zoology/flops.py)."""
    validate: Callable[[Shape, Mapping[str, Any]], list[str]] = lambda shape, args: []
    """Returns a list of problems ('key: value ... fix') for these args at this shape."""
    per_layer: Callable[[Mapping[str, Any], int], dict] = lambda args, occurrence: dict(args)
    """Module kwargs for the `occurrence`-th layer of this type (e.g. BaseConv's kernel-size cycle)."""
    aliases: tuple[str, ...] = ()
    inherits: tuple[str, ...] = ()
    """Top-level config keys this mixer also reads (e.g. attention's `pos_emb`), same names as in `defaults`."""
    mlp: type | None = None
    """A block-level replacement for the MLP (RWKV's channel mix); None keeps the configured MLP."""
    has_mlp: Callable[[Mapping[str, Any]], bool] = lambda args: True
    """Whether the block around this mixer has an MLP (and the norm before it), given the type's section;
    False: the block is norm + mixer + residual only (a Mamba block as GPT-NeoX and the Mamba paper build it)."""
    neox_keys: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """GPT-NeoX top-level true/false keys that set keys of this type's section (a config's own section value
    must agree), e.g. mamba_use_bias_in_conv -> conv_bias."""
    neox_defaults: Mapping[str, object] = field(default_factory=dict)
    """Section values of GPT-NeoX's own version of this layer type, set (where the section leaves them unset)
    when a config carries GPT-NeoX's top-level `<name>_*` keys, e.g. mamba's projection_init: init_method."""
    needs_token_ids: bool = False
    """The layer reads the raw token ids (the GPT layer specs carry them through the pipeline)."""
    before_step: Callable[[Any, float], None] | None = None
    """Called by the trainer before every optimizer step with the model (this rank's part) and the factor
    DeepSpeed applies to the language-model loss (1 / accumulation steps x the fp16 loss scale)."""
    stats: Callable[[Any], dict] | None = None
    """model -> {name: value} to log every log_interval; a collective: every rank calls it at the same step."""
    notices: Callable[[Any], list] | None = None
    """args -> start-up notices (what a valid config does differently from what its keys might suggest)."""
    state_bytes: Callable[[Shape, Mapping[str, Any], int], float] | None = None
    """(shape, this layer's args, seq_len) -> bytes of state one sequence keeps at inference after seq_len
    tokens, at STATE_BYTES per number (a KV cache grows with seq_len; a recurrence does not)."""
    memory_note: str = ""
    """Added to the dry-run memory plan's note when this type's activations are measured on the CPU."""
    doc: str = ""
    """What the layer computes: its row of the layer table in docs/layers.md (neox_zoology/doc_tables.py)."""


STATE_BYTES = 4
"""Bytes per number of inference state in `MixerSpec.state_bytes` (fp32, the recurrences' accumulation dtype)."""

DEFAULT_TYPE = "attention"
"""The layer type of every layer when a config has no attention_config (GPT-NeoX's global attention)."""

_SPECS: dict[str, MixerSpec] = {}
_ALIASES: dict[str, str] = {}


def register(spec: MixerSpec) -> MixerSpec:
    for key in (spec.name, *spec.aliases):
        if key in _SPECS or key in _ALIASES:
            raise ValueError(f"layer type {key!r} is registered twice")
    _SPECS[spec.name] = spec
    for alias in spec.aliases:
        _ALIASES[alias] = spec.name
    return spec


_NOT_IN_CONFIGS: dict[str, str] = {}


def not_in_configs(name: str, why: str) -> None:
    """A registered name a config may not write in attention_config (it means another model in GPT-NeoX
    configs); `why` says what to write instead. The type stays reachable by its aliases."""
    _NOT_IN_CONFIGS[name] = why


def config_refusal(name: str) -> str | None:
    """Why a config may not name this layer type, or None."""
    _load_builtin()
    return _NOT_IN_CONFIGS.get(name)


def config_name(name: str) -> str:
    """The name a config writes for a layer type: its own, or its first alias when the name is refused there."""
    spec = get(name)
    return next(n for n in (spec.name, *spec.aliases) if n not in _NOT_IN_CONFIGS)


def _load_builtin() -> None:
    import neox_zoology.mixers  # noqa: F401  (registers the built-in mixers)


def names(include_aliases: bool = False) -> list[str]:
    _load_builtin()
    out = sorted(_SPECS)
    return out + sorted(_ALIASES) if include_aliases else out


def canonical(name: str) -> str:
    _load_builtin()
    if name in _SPECS:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    close = difflib.get_close_matches(name, names(include_aliases=True), n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise KeyError(
        f"unknown layer type {name!r}.{hint} Registered layer types: {', '.join(names())}"
        f" (aliases: {', '.join(f'{a}->{t}' for a, t in sorted(_ALIASES.items()))})"
    )


def get(name: str) -> MixerSpec:
    return _SPECS[canonical(name)]


def hooks(layer_types, attr: str) -> list:
    """The distinct hooks `attr` ('before_step', 'stats', 'notices') of these layer types, in order."""
    out = []
    for t in dict.fromkeys(layer_types):
        hook = getattr(get(t), attr)
        if hook is not None and hook not in out:
            out.append(hook)
    return out


def is_number(v) -> bool:
    """An int or float that is not a bool (for the mixers' validation)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def resolve_args(name: str, args: Mapping[str, Any] | None) -> dict:
    """Defaults of `name` updated by `args`; unknown keys raise KeyError naming the valid ones."""
    spec = get(name)
    args = dict(args or {})
    unknown = sorted(set(args) - set(spec.defaults))
    if unknown:
        valid = ", ".join(sorted(spec.defaults)) or "(none)"
        raise KeyError(f"{spec.name}: unknown argument(s) {', '.join(unknown)}; valid: {valid}")
    return {**spec.defaults, **args}

"""Merged raw keys -> a typed, validated `Args`: every key is checked against the schema, the GPT-NeoX
tables and the registered layer types before any problem is raised (one line per problem)."""
from __future__ import annotations

import difflib
import os

from neox_zoology import registry
from neox_zoology.config.args import ARG_FIELDS, ARG_RULES, Args
from neox_zoology.config.merge import expand_attention_config
from neox_zoology.config.neox_keys import (NEOX_LAYER_TYPES, NEOX_NO_EFFECT, NEOX_NO_EFFECT_ONLY_AT_DEFAULT,
                                          NEOX_PARTITION_DEFAULTS, NEOX_REFUSED, neox_inert, neox_mamba_keys)
from neox_zoology.config.schema import ConfigError, normalize_key, show_value
from neox_zoology.config.sections import FP16
from neox_zoology.config.validate import validate_args


def _suggest(key: str, candidates) -> str:
    close = difflib.get_close_matches(key, sorted(candidates), n=3, cutoff=0.8)
    return f"; did you mean {', '.join(close)}?" if close else f"; see {KEYS_DOC} for the keys this stack accepts"


KEYS_DOC = "docs/config-keys.md"
"""Where every accepted, ignored and refused key is listed (errors point here)."""


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
    problems += neox_mamba_keys(raw, where, args.ignored_keys)
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
                if not neox_inert(key, value, raw):
                    raise ConfigError(f"{where(key)}: {key}: {show_value(value)}; {NEOX_REFUSED[key]}")
                args.ignored_keys.append(key)
            elif key in NEOX_NO_EFFECT:
                no_effect, why = NEOX_NO_EFFECT_ONLY_AT_DEFAULT.get(key, (None, ""))
                if no_effect is not None and not no_effect(value):
                    raise ConfigError(f"{where(key)}: {key}: {show_value(value)}; {why} (this GPT-NeoX key is accepted "
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
    if args.pipe_partition_method in NEOX_PARTITION_DEFAULTS:
        args.pipe_partition_method = "type:ZooBlock"
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    _neox_precision(args, where)
    validate_args(args, where)
    return args


def _neox_precision(args: Args, where) -> None:
    """GPT-NeoX's `fp16: {type: bfloat16, enabled: true}` (Pythia 1B) means bf16."""
    if args.fp16.get("type") == "bfloat16":
        enabled = args.fp16["enabled"]
        args.fp16 = FP16.normalized({"enabled": False})
        if enabled:
            args.bf16 = {**args.bf16, "enabled": True}

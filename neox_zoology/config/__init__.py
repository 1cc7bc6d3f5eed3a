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

The modules of this package: docs/layout.md.
"""
from __future__ import annotations

from neox_zoology.config.args import Args
from neox_zoology.config.build import build_args
from neox_zoology.config.checks import check_launch, check_model_keys, check_paths, pad_vocab, writable_problem
from neox_zoology.config.merge import expand_attention_config, merge_files
from neox_zoology.config.schema import ConfigError, Rule, normalize_key
from neox_zoology.config.sections import AR_EVAL, AR_EVAL_DEFAULTS, BF16, FP16, OPTIMIZER, OPTIMIZER_PARAMS, ZERO
from neox_zoology.config.validate import validate_ar_eval

__all__ = ["AR_EVAL", "AR_EVAL_DEFAULTS", "Args", "BF16", "ConfigError", "FP16", "OPTIMIZER", "OPTIMIZER_PARAMS",
           "Rule", "ZERO", "build_args", "check_launch", "check_model_keys", "check_paths", "expand_attention_config",
           "load", "merge_files", "normalize_key", "pad_vocab", "validate_ar_eval", "writable_problem"]


def load(paths, overrides=(), sets=(), world_size: int | None = None) -> Args:
    raw, source = merge_files(paths, overrides, sets)
    return build_args(raw, source, world_size)

"""Reading and merging GPT-NeoX YAML files: keys may use `-` or `_`; a key set in two files is an error
naming both, except the groups a later file replaces (KEY_GROUPS, REPLACEABLE_KEYS); `--override FILE`
and `--set key=value` come after the files. `attention_config` expands to one layer type per layer."""
from __future__ import annotations

from pathlib import Path

import yaml

from neox_zoology.config.schema import ConfigError, normalize_key


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

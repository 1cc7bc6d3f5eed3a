"""Read a training checkpoint (any TP / PP layout) or an export folder into one process.

Checkpoint: `<dir>/global_step<N>/` (or `<dir>` with `latest`) as training/checkpoint.py writes it through
DeepSpeed: `configs/config.yml` (the run's config), `configs/model.json` (the model's identity and every
parameter's full shape), and the weights either in `mp_rank_<TP>_model_states.pt` (plain engine, keys
`layers.<i>.<name>`) or in `layer_<i>-model_<TP>-model_states.pt` (pipeline engine, one file per layer,
keys `<name>`). Each file is read with `torch.load(weights_only=True)`; the TP shards of a parameter are
concatenated along the one dimension where the shard's shape differs from the full shape (each rank holds a
contiguous slice of a tensor drawn at full size), replicated parameters are taken from rank 0.

Export: `<dir>/config.json` (the run's config and the model identity) and `<dir>/model.safetensors`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import yaml

EXPORT_CONFIG = "config.json"
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_FORMAT = "neox_zoology-export-1"

_PLAIN = re.compile(r"mp_rank_(\d+)_model_states\.pt$")
_PIPE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt$")


class LoadError(RuntimeError):
    """A checkpoint or export folder that cannot be read, phrased for the user (one line)."""


def checkpoint_dir(path) -> Path:
    """`path` itself when it is a checkpoint (configs/config.yml) or an export; else the one `latest` names."""
    p = Path(path)
    if (p / EXPORT_CONFIG).exists() or (p / "configs" / "config.yml").exists():
        return p
    latest = p / "latest"
    if latest.exists():
        tag = latest.read_text().strip()
        if (p / tag / "configs" / "config.yml").exists():
            return p / tag
        raise LoadError(f"{latest} names {tag!r}, which is not a complete checkpoint; write an existing "
                        f"global_step<N> into it or pass that folder")
    raise LoadError(f"{p}: not a checkpoint (no configs/config.yml, no `latest`) and not an export "
                    f"(no {EXPORT_CONFIG}); pass a folder written by training (`save`) or by neox_zoology.export")


def _torch_load(path: Path) -> dict:
    try:
        from neox_zoology.training.checkpoint.loading import load_weights_only

        return load_weights_only(path, "cpu")
    except Exception as exc:  # noqa: BLE001 - one line naming the file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
        raise LoadError(f"{path}: unreadable checkpoint file ({first}); it is truncated, corrupted or not "
                        f"written by this project") from None


def _kept(key: str, value) -> bool:
    """Tensors, and the plain extra states some layers keep (e.g. a sparse layer's selection seed)."""
    return torch.is_tensor(value) or (key.endswith("_extra_state") and isinstance(value, dict))


def read_shards(ckpt: Path) -> dict[str, list[torch.Tensor]]:
    """name (SequentialGPT's `layers.<i>.<name>`) -> the TP shards of that tensor, in rank order."""
    shards: dict[str, dict[int, torch.Tensor]] = {}
    pipe = sorted(p for p in ckpt.iterdir() if _PIPE.search(p.name))
    if pipe:
        for f in pipe:
            layer, rank = map(int, _PIPE.search(f.name).groups())
            for k, v in _torch_load(f).items():
                if _kept(k, v):
                    shards.setdefault(f"layers.{layer}.{k}", {})[rank] = v
    else:
        plain = sorted(p for p in ckpt.iterdir() if _PLAIN.search(p.name))
        if not plain:
            raise LoadError(f"{ckpt}: no model-state files (mp_rank_*_model_states.pt or layer_*-model_*-"
                            f"model_states.pt); the checkpoint is incomplete")
        for f in plain:
            rank = int(_PLAIN.search(f.name).group(1))
            module = _torch_load(f).get("module")
            if not isinstance(module, dict):
                raise LoadError(f"{f}: holds no model weights ('module' is empty); the checkpoint is incomplete")
            for k, v in module.items():
                if _kept(k, v):
                    shards.setdefault(k, {})[rank] = v
    return {k: [by_rank[r] for r in sorted(by_rank)] for k, by_rank in shards.items()}


def merge(name: str, parts: list[torch.Tensor], full: list[int]) -> torch.Tensor:
    """One full tensor from its TP shards (see the module docstring)."""
    first = parts[0]
    if not torch.is_tensor(first) or list(first.shape) == list(full):
        return first
    dims = [i for i, (a, b) in enumerate(zip(first.shape, full)) if a != b]
    if len(dims) != 1 or first.dim() != len(full) or first.shape[dims[0]] * len(parts) != full[dims[0]]:
        raise LoadError(f"{name}: {len(parts)} shard(s) of shape {list(first.shape)} do not make the saved full "
                        f"shape {full}; the checkpoint's files do not belong together")
    return torch.cat(parts, dim=dims[0])


def checkpoint_weights(ckpt: Path, shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """The full (TP- and PP-merged) state dict of a checkpoint for a model with these full shapes."""
    shards = read_shards(ckpt)
    extra = {k: v[0] for k, v in shards.items() if not torch.is_tensor(v[0])}
    missing = sorted(set(shapes) - set(shards))
    if missing:
        raise LoadError(f"{ckpt}: no weights for {', '.join(missing[:4])}" + (f" (+{len(missing) - 4} more)"
                        if len(missing) > 4 else "") + "; the checkpoint is incomplete")
    return {**{k: merge(k, shards[k], shapes[k]) for k in shapes}, **extra}


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LoadError(f"{path}: unreadable ({exc}); restore the file from where the checkpoint came from") from None


def read_config(ckpt: Path) -> tuple[dict, dict]:
    """(raw config keys, model identity) of a checkpoint or export folder."""
    if (ckpt / EXPORT_CONFIG).exists():
        data = read_json(ckpt / EXPORT_CONFIG)
        if data.get("format") != EXPORT_FORMAT:
            raise LoadError(f"{ckpt / EXPORT_CONFIG}: format {data.get('format')!r}, expected {EXPORT_FORMAT!r}; "
                            f"export the checkpoint again with python -m neox_zoology.export")
        return data["config"], data["identity"]
    try:
        raw = yaml.safe_load((ckpt / "configs" / "config.yml").read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise LoadError(f"{ckpt}/configs/config.yml: unreadable ({exc}); restore the file") from None
    return raw, read_json(ckpt / "configs" / "model.json")

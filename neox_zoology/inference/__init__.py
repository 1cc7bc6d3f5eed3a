"""Inference from a checkpoint or an export: `load(path)` -> an `InferenceModel` (prefill / step).

Details: docs/inference.md.
"""
from __future__ import annotations

from pathlib import Path

import torch

from neox_zoology.inference.loading import (EXPORT_CONFIG, EXPORT_WEIGHTS, LoadError, checkpoint_dir,
                                            checkpoint_weights, read_config, read_json)
from neox_zoology.inference.model import InferenceModel, state_bytes

__all__ = ["load", "build", "InferenceModel", "LoadError", "state_bytes", "inference_args"]

SINGLE_PROCESS = {"model_parallel_size": 1, "pipe_parallel_size": 0, "lm_head_chunk_tokens": 0,
                  "checkpoint_activations": False, "compile": False, "hidden_dropout": 0.0,
                  "attention_dropout": 0.0}
"""Keys a single-process decoder sets whatever the run had (the weights do not depend on them)."""

_RUN_ONLY = ("load", "save", "tensorboard_dir", "log_dir", "data_path", "train_data_paths", "valid_data_paths",
             "test_data_paths", "data_cache_path", "eval_tasks", "eval_tasks_include_path", "eval_tasks_limit")


def inference_args(raw: dict, identity: dict):
    """The run's Args at TP = PP = 1, with the saved padded vocabulary (it depends on the training TP size)."""
    from neox_zoology.config import build_args

    raw = {k: v for k, v in raw.items() if k not in _RUN_ONLY}
    raw.update(SINGLE_PROCESS)
    for key in ("ar_eval",):
        if isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], "enabled": False}
    args = build_args(raw, world_size=1)
    args.padded_vocab_size = int(identity["model"]["padded_vocab_size"])
    if args.vocab_size is None:
        args.vocab_size = args.padded_vocab_size
    return args


def build(args, state_dict=None) -> InferenceModel:
    """An InferenceModel for these Args. `state_dict`: a dict of full weights, or a callable taking the
    model's {name: full shape} and returning it; None keeps the run's initialisation."""
    from neox_zoology.model.gpt import SequentialGPT
    from neox_zoology.training.engine import model_config

    gpt = SequentialGPT(args, model_config(args, perform_initialization=state_dict is None))
    if callable(state_dict):
        state_dict = state_dict({k: list(v.shape) for k, v in gpt.state_dict().items() if torch.is_tensor(v)})
    if state_dict is not None:
        own = gpt.state_dict()
        unknown = sorted(set(state_dict) - set(own))
        missing = sorted(k for k in own if k not in state_dict and not k.endswith("_extra_state"))
        if unknown or missing:
            raise LoadError(f"the weights do not fit the model of their config: missing {missing[:3]}, unexpected "
                            f"{unknown[:3]}")
        gpt.load_state_dict(state_dict, strict=False)
    return InferenceModel(gpt, args)


def load(path, dtype: torch.dtype = torch.float32) -> InferenceModel:
    """A training checkpoint folder (`save` dir or one global_step<N>) or an export folder -> InferenceModel."""
    ckpt = checkpoint_dir(path)
    raw, identity = read_config(ckpt)
    args = inference_args(raw, identity)
    if (ckpt / EXPORT_WEIGHTS).exists():
        from safetensors.torch import load_file

        weights = {**load_file(str(ckpt / EXPORT_WEIGHTS)), **read_json(ckpt / EXPORT_CONFIG).get("extra_state", {})}
    else:
        def weights(shapes):  # the TP = 1 model's shapes: model.json records the saving rank's shard shapes
            return checkpoint_weights(Path(ckpt), shapes)
    model = build(args, weights).to(dtype)
    model.source = str(ckpt)
    model.raw_config = raw
    model.identity = identity
    return model

"""What a checkpoint holds, checked against the configured run before anything loads: the model
(`configs/model.json`: the keys that define its function and every parameter's shape; `finetune` allows
changes that keep every shape) and the parallel layout (`configs/topology.json`)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from neox_zoology.config import ConfigError
from neox_zoology.training.checkpoint.files import MODEL_JSON, listing, read_checkpoint_json

def model_keys(args) -> dict:
    """The config values that define the model's function, resolved (padded vocabulary, MLP width, one
    layer type per layer, each type's section with its defaults)."""
    keys = {k: getattr(args, k) for k in (
        "num_layers", "hidden_size", "num_attention_heads", "norm", "activation", "ffn_hidden_size", "mlp_width",
        "use_bias_in_mlp", "use_bias_in_norms", "bias_gelu_fusion",
        "use_bias_in_attn_linear", "pos_emb", "rotary_pct", "rotary_emb_base", "no_weight_tying", "gpt_j_residual",
        "padded_vocab_size")}
    keys["norm_epsilon"] = args.layernorm_epsilon if args.norm == "layernorm" else args.rms_norm_epsilon
    if args.pos_emb == "learned":
        keys["max_position_embeddings"] = args.max_position_embeddings
    keys["layer_types"] = list(args.layer_types)
    keys["mixers"] = {t: args.mixer_args(t) for t in sorted(set(args.layer_types))}
    return json.loads(json.dumps(keys))  # plain JSON values, comparable with a saved copy


def parameter_shapes(args) -> dict[str, list[int]]:
    """Name -> shape of every parameter of the whole model (TP = PP = 1 view), built on the meta device."""
    from neox_zoology.model.gpt import SequentialGPT
    from neox_zoology.training.engine import model_config

    world, tp = args.world_size, args.model_parallel_size
    args.world_size, args.model_parallel_size = 1, 1
    try:
        with torch.device("meta"):
            model = SequentialGPT(args, model_config(args, perform_initialization=False))
    finally:
        args.world_size, args.model_parallel_size = world, tp
    return {name: list(p.shape) for name, p in model.named_parameters()}


def model_identity(args) -> dict:
    """What `configs/model.json` records (computed once per Args)."""
    cached = getattr(args, "_model_identity", None)
    if cached is None:
        cached = {"model": model_keys(args), "seq_length": args.seq_length, "parameters": parameter_shapes(args)}
        args._model_identity = cached
    return cached


def _show(v) -> str:
    text = json.dumps(v) if not isinstance(v, str) else v
    return text if len(text) <= 80 else text[:77] + "..."


def model_differences(saved: dict, now: dict) -> list[str]:
    """'key: saved X, this run Y' for each model key that differs (mixer arguments per type)."""
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k), now.get(k)
        if k == "mixers" and isinstance(a, dict) and isinstance(b, dict):
            for t in sorted(set(a) & set(b)):
                for arg in sorted(set(a[t]) | set(b[t])):
                    if a[t].get(arg) != b[t].get(arg):
                        out.append(f"{t}.{arg}: saved {_show(a[t].get(arg))}, this run {_show(b[t].get(arg))}")
            continue
        if k == "layer_types" and isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            changed = [f"{i}: {x} -> {y}" for i, (x, y) in enumerate(zip(a, b)) if x != y]
            if changed:
                out.append(f"layer types differ at layer {', '.join(changed[:4])}"
                           + (f" (+{len(changed) - 4} more)" if len(changed) > 4 else ""))
            continue
        if a != b:
            out.append(f"{k}: saved {_show(a)}, this run {_show(b)}")
    return out


def shape_differences(saved: dict, now: dict) -> list[str]:
    out = [f"parameter {n}: saved {saved[n]}, this run {now[n]}" for n in sorted(set(saved) & set(now))
           if saved[n] != now[n]]
    out += [f"parameter {n} is only in the checkpoint" for n in sorted(set(saved) - set(now))]
    out += [f"parameter {n} is not in the checkpoint" for n in sorted(set(now) - set(saved))]
    return out


def check_model(args, ckpt: Path, finetune: bool, what: str = "load") -> list[str]:
    """Refuse a checkpoint of another model (ConfigError listing the differences); returns notices
    (a changed seq_length; under finetune, the weight-preserving changes)."""
    path = ckpt / "configs" / MODEL_JSON
    saved = read_checkpoint_json(path, "the model this checkpoint holds")
    now = model_identity(args)
    notices = []
    if saved.get("seq_length") != now["seq_length"]:
        notices.append(f"{what}: {ckpt} was trained at seq_length {saved.get('seq_length')}; this run uses "
                       f"{now['seq_length']}")
    keys = model_differences(saved.get("model", {}), now["model"])
    shapes = shape_differences(saved.get("parameters", {}), now["parameters"])
    if finetune:
        if shapes:
            raise ConfigError(f"{what}: {ckpt} holds other parameter shapes than this config builds "
                              f"({listing(shapes)}); finetune keeps weights as they are, so the shapes must match")
        if keys:
            notices.append(f"finetune: the model differs from {ckpt} in ways that keep every weight: "
                           f"{listing(keys, 10)}")
        return notices
    if keys or shapes:
        raise ConfigError(
            f"{what}: {ckpt} holds another model than this config builds: {listing(keys or shapes)}. Resume "
            f"with the saved model's settings (its configs/config.yml), or set finetune: true to start a new run "
            f"from these weights (only changes that keep every weight's shape)")
    return notices


def topology(args) -> dict:
    return {"tensor_parallel": args.tp, "pipe_parallel": args.pp, "data_parallel": args.dp,
            "zero_stage": int(args.zero_optimization.get("stage", 0))}


def check_topology(args, ckpt: Path) -> None:
    """Resuming needs the same TP and PP; a different DP size only without ZeRO partitioning (stage 0),
    where every rank holds the whole optimizer state. Anything else fails here, before training."""
    saved, now = read_checkpoint_json(ckpt / "configs" / "topology.json", "the parallel layout it was saved with"), topology(args)
    changed = [k for k in ("tensor_parallel", "pipe_parallel", "zero_stage") if saved.get(k) != now[k]]
    if saved.get("data_parallel") != now["data_parallel"] and (saved.get("zero_stage") or now["zero_stage"]):
        changed.append("data_parallel")
    if changed:
        def show(t):
            return ", ".join(f"{k} {t.get(k)}" for k in now)

        raise ConfigError(
            f"load: {ckpt} was saved with {show(saved)}; this run has {show(now)}. "
            f"{', '.join(changed)} differ: resume with the saved sizes (a different data-parallel size works only "
            f"with zero_optimization.stage 0 on both sides), or start a new run without `load`"
        )

"""Per-rank memory plan of a training config: parameters, gradients, optimizer state and activations.

`python train.py CONFIG... --dry-run [--world-size N]` prints it (see `dryrun.py`). Everything is in
bytes per rank, for the pipeline stage that needs the most; nothing is allocated: the stage is built
on the meta device with this rank's tensor-parallel shapes (`stage`), its state follows DeepSpeed's
optimizer wrappers (`state`), and its activations are measured by running one micro-batch forward and
backward there (`tracer`, `activations`).

peak = params + gradients + optimizer + max(activation peak, step transient) + runtime reserve. The
largest micro-batch that fits scales the activations in proportion to the micro-batch. The accounting,
its sources in DeepSpeed and torch, and what is not modelled: docs/memory-plan.md.
"""
from __future__ import annotations

from neox_zoology import registry
from neox_zoology.training.memory.activations import checkpoint_group_size, compose, measure_stage, saved_by_layer_type
from neox_zoology.training.memory.stage import (build_stage, buffer_bytes, distinct_parameters, layout_of,
                                                stage_bounds, tensor_parallel_view)
from neox_zoology.training.memory.state import DEFAULT_REDUCE_BUCKET, engine_path, state_bytes, zero_stage
from neox_zoology.training.memory.tracer import LiveStorages, target_kernels

__all__ = ["DEFAULT_REDUCE_BUCKET", "GIB", "GPUS", "LiveStorages", "RUNTIME_RESERVE", "engine_path", "format_table",
           "layout_of", "plan", "state_bytes", "target_kernels"]

GIB = 1 << 30
GPUS = (("40 GB", int(39.5 * GIB)), ("80 GB", int(79.3 * GIB)))
"""GPU classes the plan is checked against: (name, usable bytes as torch reports the device's total)."""
RUNTIME_RESERVE = 2 * GIB
"""CUDA context, NCCL/cuBLAS workspaces and allocator fragmentation (not in the counted tensors)."""


def describe(measured: dict) -> str:
    """'embedding, 24 x attention, head' for a stage's sequence of regions."""
    parts: list[list] = []
    for key in measured["sequence"]:
        name = key if isinstance(key, str) else key[0]
        name = {"stage_input": "input from the previous stage", "head": "final norm + LM head + loss"}.get(name, name)
        if parts and parts[-1][0] == name:
            parts[-1][1] += 1
        else:
            parts.append([name, 1])
    return ", ".join(name if n == 1 else f"{n} x {name}" for name, n in parts)


def plan(args, world_size: int | None = None, target: str = "cuda", micro_batch: int | None = None) -> dict:
    """Per-rank memory plan for `args` (its own precision, ZeRO stage, TP/PP, micro-batch and
    checkpointing) at `world_size` ranks (default `args.world_size`); every figure in bytes.

    `target` "cuda" (default) counts the tensors the CUDA kernels keep and adds the runtime reserve;
    "cpu" counts what the CPU kernels keep and adds nothing (for comparison with a CPU run).
    """
    from neox_zoology.model.gpt import layer_specs
    from neox_zoology.training.engine import model_config

    if target not in ("cuda", "cpu"):
        raise ValueError(f"target {target!r}: use 'cuda' or 'cpu'")
    lay = layout_of(args, world_size)
    mb = int(micro_batch or args.train_micro_batch_size_per_gpu)
    group = checkpoint_group_size(args)
    saved_world = args.world_size
    args.world_size = lay.world
    stages = []
    try:
        with tensor_parallel_view(lay.tp):
            specs = layer_specs(args, model_config(args, perform_initialization=False))
            counts = None
            if args.pipe_partition_method.lower() == "parameters" and lay.pp > 1:
                counts = [sum(p.numel() for p in distinct_parameters(build_stage(specs, i, i + 1)))
                          for i in range(len(specs))]
            bounds = stage_bounds(args, specs, counts)
            for index, (start, stop) in enumerate(bounds):
                stage = build_stage(specs, start, stop)
                params = distinct_parameters(stage)
                n = sum(p.numel() for p in params)
                state = state_bytes(args, n, max((p.numel() for p in params), default=0), lay.dp)
                state["parameters"] += buffer_bytes(stage)
                measured = measure_stage(args, specs, start, stop, stage, first=index == 0,
                                         last=index == len(bounds) - 1, micro_batch=mb, target=target)
                in_flight = min(lay.pp - index, args.gradient_accumulation_steps) if args.pipe_parallel_size >= 1 else 1
                stages.append(_stage_plan(args, index, n, state, measured, group, in_flight, mb, target))
                del stage, params
    finally:
        args.world_size = saved_world
    busiest = max(stages, key=lambda st: st["peak"])
    out = {
        "world_size": lay.world, "tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "zero_stage": zero_stage(args),
        "dtype": args.dtype_name, "micro_batch": mb, "seq_length": args.seq_length,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "checkpoint_activations": bool(args.checkpoint_activations), "checkpoint_group": group,
        "lm_head_chunk_tokens": int(args.lm_head_chunk_tokens), "target": target, "stage": busiest["stage"],
    }
    out.update({k: busiest[k] for k in ("layers", "parameters_count", "parameters", "gradients", "optimizer",
                                        "activations", "total", "transient", "runtime_reserve", "peak", "fits",
                                        "max_micro_batch", "accounting", "notes")})
    out["stages"] = stages
    return out


def _stage_plan(args, index, n, state, measured, group, in_flight, mb, target) -> dict:
    acts = compose(measured, group, in_flight)
    static = state["parameters"] + state["gradients"] + state["optimizer"]
    reserve = RUNTIME_RESERVE if target == "cuda" else 0
    transient = max(acts["peak"], state["step_transient"]) - acts["kept"]
    peak = static + acts["kept"] + transient + reserve
    fits = {name: {"fits": peak <= cap, "headroom_bytes": cap - peak} for name, cap in GPUS}
    # activations are proportional to the micro-batch (every kept tensor has a batch dimension, up to
    # a few batch-independent ones such as FFT filter spectra): the largest micro-batch that fits
    largest = {}
    for ckpt in (False, True):
        a = compose(measured, checkpoint_group_size(args, ckpt), in_flight)
        per_sample = a["peak"] / mb
        key = "checkpoint_activations" if ckpt else "no_checkpointing"
        largest[key] = {}
        for name, cap in GPUS:
            room = cap - static - reserve
            m = int(room // per_sample) if per_sample > 0 else 0
            if room < state["step_transient"]:
                m = 0
            largest[key][name] = max(m, 0)
    notes = list(state["notes"])
    for key, cost in measured["costs"].items():
        if cost.where != "meta":
            name = key if isinstance(key, str) else key[0]
            note = registry.get(name).memory_note if name in registry.names() else ""
            notes.append(f"{name}: measured on the CPU at micro-batch 1 and scaled (its control flow reads "
                         f"values{'; ' + note if note else ''})")
    return {
        "stage": index, "layers": describe(measured), "parameters_count": n,
        "parameters": state["parameters"], "gradients": state["gradients"], "optimizer": state["optimizer"],
        "activations": acts["kept"], "micro_batches_in_flight": in_flight,
        "activation_peak": acts["peak"], "step_transient": state["step_transient"],
        "total": static + acts["kept"], "transient": transient, "runtime_reserve": reserve, "peak": peak,
        "fits": fits, "max_micro_batch": largest, "saved_by_layer_type": saved_by_layer_type(measured),
        "accounting": state["accounting"], "notes": notes,
    }


def format_table(p: dict) -> str:
    """The plan as the dry run prints it."""
    gib = lambda n: f"{n / GIB:9.2f}"  # noqa: E731
    z = p["zero_stage"]
    head = (f"memory per rank, {p['dtype']}, ZeRO {z}, TP {p['tp']} x PP {p['pp']} x DP {p['dp']} = {p['world_size']} "
            f"GPU{'s' if p['world_size'] > 1 else ''}; micro-batch {p['micro_batch']} x {p['seq_length']} tokens"
            + (f", checkpointing every {p['checkpoint_group']} block(s)" if p["checkpoint_group"] else "")
            + (f", LM head in chunks of {p['lm_head_chunk_tokens']} tokens" if p["lm_head_chunk_tokens"] else ""))
    where = f"stage {p['stage']} of {p['pp']}: " if p["pp"] > 1 else ""
    rows = [
        ("parameters", p["parameters"], f"{p['parameters_count'] / 1e6:.1f}M on this rank"),
        ("gradients", p["gradients"], ""),
        ("optimizer state", p["optimizer"], "Adam m, v" if p["dtype"] == "fp32" and p["zero_stage"] == 0
         else "fp32 master + Adam m, v"),
        ("activations", p["activations"], "kept for backward"),
        ("total", p["total"], ""),
        ("transient peak", p["transient"], "backward / optimizer-step temporaries"),
    ]
    if p["runtime_reserve"]:
        rows.append(("runtime reserve", p["runtime_reserve"], "CUDA context, NCCL, allocator"))
    rows.append(("peak", p["peak"], ""))
    lines = [head, f"  {where}{p['layers']}", f"  {'':<18}{'GiB':>9}"]
    for name, value, note in rows:
        lines.append(f"  {name:<18}{gib(value)}  {note}".rstrip())
    lines.append(f"  ({p['accounting']})")
    for note in p["notes"]:
        lines.append(f"  note: {note}")
    for name, _ in GPUS:
        f = p["fits"][name]
        mbs = p["max_micro_batch"]
        lines.append(f"fits {name}: {'yes' if f['fits'] else 'no'} (headroom {f['headroom_bytes'] / GIB:.1f} GiB); "
                     f"largest micro-batch that fits: {mbs['no_checkpointing'][name]} without, "
                     f"{mbs['checkpoint_activations'][name]} with activation checkpointing")
    return "\n".join(lines)

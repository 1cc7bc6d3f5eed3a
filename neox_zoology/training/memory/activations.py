"""Activation bytes of a stage, measured: one block of each distinct kind runs one micro-batch forward and
backward, region by region, under `LiveStorages` and autograd's saved-tensor hooks (`measure_regions`);
`compose` then builds the stage's kept bytes and peaks over its real sequence of layers, with activation
checkpointing groups and the micro-batches a pipeline schedule keeps in flight. docs/memory-plan.md
gives the composition rules."""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from neox_zoology import registry
from neox_zoology.training.engine import DTYPES
from neox_zoology.training.memory.stage import alloc_device
from neox_zoology.training.memory.tracer import LiveStorages, target_kernels


def checkpoint_group_size(args, enabled: bool | None = None) -> int:
    """Blocks per recomputed group: checkpoint_num_layers under the plain engine, 1 under the pipeline
    engine (it checkpoints every ZooBlock on its own); 0 = no activation checkpointing."""
    if not (args.checkpoint_activations if enabled is None else enabled):
        return 0
    return 1 if args.pipe_parallel_size >= 1 else int(args.checkpoint_num_layers)


@dataclass
class RegionCost:
    """Activation bytes of one region of a stage (the embedding, one block, the head + loss) for one
    micro-batch, measured in a chain of regions (see `measure_regions`)."""

    label: str
    kept: int = 0
    """allocated in its forward and still alive after the whole forward (kept for backward)"""
    forward: int = 0
    """peak during its forward above the live bytes before it"""
    backward: int = 0
    """peak during its backward above the bytes kept up to it (so the incoming gradient included)"""
    grad_in: int = 0
    """the gradient arriving at its output (alive when its backward starts)"""
    output: int = 0
    """its hidden-state output (what a checkpointed group keeps)"""
    saved: int = 0
    """distinct storages it saves for backward (parameters, buffers and its input's storage excluded
    when an earlier region saved it first)"""
    where: str = "meta"

    def scaled(self, factor: float) -> "RegionCost":
        return RegionCost(self.label, *(int(round(getattr(self, f) * factor)) for f in
                                        ("kept", "forward", "backward", "grad_in", "output", "saved")), self.where)


def measure_regions(args, regions, first: bool, micro_batch: int, target: str,
                    device: str = "meta") -> list[RegionCost]:
    """Run `regions` (each a list of (module, forward_fn); the last may end with the loss, marked by
    label "head") as one chain, forward then backward region by region, on `device`; returns their costs.

    Every region's hidden-state input is a detached alias of the previous output (same storage), so each
    backward can be timed on its own; the storages and their owners are those of the undivided model.
    """
    from neox_zoology.model.gpt import lm_loss

    dtype = DTYPES[args.dtype_name]
    s, b, h = args.seq_length, micro_batch, args.hidden_size
    params, keys_outside = [], set()
    for label, mods in regions:
        for module, _ in mods:
            module.train()
            for p in module.parameters():
                params.append(p)
    for p in params:  # as DeepSpeed casts the module: parameters to the model dtype, buffers kept
        if p.dtype != dtype:
            p.data = p.data.to(dtype)
        p.requires_grad_(True)
    for label, mods in regions:
        for module, _ in mods:
            keys_outside |= {t.untyped_storage()._cdata for t in (*module.parameters(), *module.buffers())}

    mode = LiveStorages()
    saved: list[tuple[str, int]] = []  # (region, bytes) per distinct storage saved for backward
    saved_alive: dict[int, int] = {}  # storage key -> saved tensors of it still alive (keys are addresses)
    recording = [True]

    def forget(key):
        saved_alive[key] -= 1
        if not saved_alive[key]:
            del saved_alive[key]

    def pack(t):
        # a detached alias, not t: a node that saves its own output (exp, sigmoid, ...) would otherwise hold
        # itself through t's grad_fn, a cycle that keeps a discarded branch of the graph alive
        kept_alias = t.detach()
        key = t.untyped_storage()._cdata
        if recording[0] and key not in keys_outside:
            if key not in saved_alive:
                saved.append((mode.region, t.untyped_storage().nbytes()))
            saved_alive[key] = saved_alive.get(key, 0) + 1
            weakref.finalize(kept_alias, forget, key)
        return kept_alias

    costs = [RegionCost(label, where=device) for label, _ in regions]
    records = []
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with alloc_device(device), target_kernels(target), mode, hooks:
        tokens = torch.zeros(b, s, dtype=torch.long, device=device)
        if first:
            x = tokens
        else:
            mode.region = "stage_input"
            x = (torch.zeros(s, b, h, dtype=dtype, device=device), tokens)
        for (label, mods), cost in zip(regions, costs):
            mode.region = label
            inp = x
            if isinstance(x, tuple):
                inp = (x[0].detach().requires_grad_(True), x[1])
            live0 = mode.live
            mode.reset_peak()
            out = inp
            for module, fn in mods:
                out = fn(module, out) if fn is not None else module(out)
            if label == "head":
                labels = torch.zeros(b, s, dtype=torch.long, device=device)
                out = lm_loss(out, (labels, torch.ones(b, s, device=device)))
            else:
                cost.output = out[0].untyped_storage().nbytes()
            cost.forward = mode.peak - live0
            records.append((inp, out))
            x = out
        del x, inp, out
        recording[0] = False
        kept = mode.live_by_region()
        for cost in costs:
            cost.kept = kept.get(cost.label, 0)
        grad = None
        for i in reversed(range(len(regions))):
            inp, out = records[i]
            records[i] = None
            if not isinstance(inp, tuple):  # the embedding: its backward yields only its weight's gradient
                break
            mode.region = "backward"
            if grad is None and costs[i].label != "head":
                grad = torch.zeros_like(out[0])
            costs[i].grad_in = grad.untyped_storage().nbytes() if grad is not None else 0
            live0 = mode.live - costs[i].grad_in
            mode.reset_peak()
            target_out = out if costs[i].label == "head" else out[0]
            (grad,) = torch.autograd.grad(target_out, [inp[0]], grad_outputs=None if costs[i].label == "head" else grad)
            costs[i].backward = mode.peak - live0
            del inp, out, target_out
        del grad, records
    for region, n in saved:
        for cost in costs:
            if cost.label == region:
                cost.saved += n
    return costs


def _block_key(spec) -> tuple:
    """Blocks with equal keys have equal activations: same layer type, same per-layer arguments."""
    args, _config, _number, layer_type, occurrence = spec.module_args
    per_layer = registry.get(layer_type).per_layer(args.mixer_args(layer_type), occurrence)
    return layer_type, repr(sorted(per_layer.items()))


def stage_regions(specs, start: int, stop: int, stage) -> tuple[list, list]:
    """Split a built stage into regions: ("embedding", ...), one per block, ("head", ...) (final norm, LM
    head and loss). Returns (regions in order with the block key in place of blocks' labels, the keys)."""
    from neox_zoology.model.block import ZooBlock

    regions, keys = [], []
    pending: list = []
    for spec, (module, fn) in zip(specs[start:stop], stage):
        module._memory_spec = spec  # for a rebuild on the CPU (see _rebuild_on_cpu)
        if isinstance(module, ZooBlock):
            if pending:
                regions.append(("embedding", pending))
                pending = []
            key = _block_key(spec)
            keys.append(key)
            regions.append((key, [(module, fn)]))
        else:
            pending.append((module, fn))
    if pending:
        regions.append(("head" if keys or start > 0 else "embedding", pending))
    return regions, keys


def measure_stage(args, specs, start: int, stop: int, stage, first: bool, last: bool, micro_batch: int,
                  target: str = "cuda") -> dict:
    """Activation costs of one micro-batch on a built stage: one chain with one block of each distinct
    kind (meta device; a block kind the meta device cannot run, e.g. a sparse layer whose selection
    depends on values, runs for real on the CPU at micro-batch 1 and is scaled), then composed over the
    stage's real sequence of layers by `compose`."""
    regions, keys = stage_regions(specs, start, stop, stage)
    chain, seen = [], {}
    for key, mods in regions:
        if key in ("embedding", "head") or key not in seen:
            seen[key] = len(chain)
            chain.append((key, mods))
    labelled = [(key if isinstance(key, str) else f"block{seen[key]}", mods) for key, mods in chain]
    try:
        costs = measure_regions(args, labelled, first, micro_batch, target)
        by_key = {key: cost for (key, _), cost in zip(chain, costs)}
    except (RuntimeError, NotImplementedError):
        by_key = _measure_separately(args, chain, labelled, first, micro_batch, target)
    sequence = (["stage_input"] if not first else []) + [key for key, _ in regions]
    itemsize = DTYPES[args.dtype_name].itemsize
    input_bytes = 0 if first else micro_batch * args.seq_length * args.hidden_size * itemsize
    return {"sequence": sequence, "costs": by_key, "stage_input": input_bytes}


def _measure_separately(args, chain, labelled, first, micro_batch, target) -> dict:
    """Fallback: each region on its own (an input made up for it), on meta, or on the CPU at micro-batch 1."""
    out = {}
    for (key, mods), (label, _) in zip(chain, labelled):
        region_first = first and key == "embedding"
        try:
            (cost,) = measure_regions(args, [(label, mods)], region_first, micro_batch, target)
        except (RuntimeError, NotImplementedError):
            cpu_mods = _rebuild_on_cpu(mods)
            (cost,) = measure_regions(args, [(label, cpu_mods)], region_first, 1, target, device="cpu")
            cost = cost.scaled(micro_batch)
            cost.where = "cpu, micro-batch 1, scaled"
        out[key] = cost
    return out


def _rebuild_on_cpu(mods):
    """The same layers built on the CPU with small random weights (for a run whose control flow reads values)."""
    out = []
    with torch.device("cpu"):
        for module, fn in mods:
            new = module._memory_spec.build()
            with torch.no_grad():
                for p in new.parameters():
                    p.normal_(0.0, 0.02)
            out.append((new, fn))
    return out


def compose(measured: dict, group: int, in_flight: int = 1) -> dict:
    """Stage activations from region costs: kept bytes, forward and backward peaks, for `in_flight`
    micro-batches kept at once (pipeline schedule) and checkpoint groups of `group` blocks (0 = none)."""
    costs, sequence = measured["costs"], measured["sequence"]
    units = []  # (bytes the unit keeps, its forward peak, its backward peak, recomputed?, its output's bytes)
    i = 0
    while i < len(sequence):
        key = sequence[i]
        if group and key not in ("stage_input", "embedding", "head"):
            j = i
            while j < len(sequence) and j - i < group and sequence[j] not in ("stage_input", "embedding", "head"):
                j += 1
            members = [costs[k] for k in sequence[i:j]]
            # keeps only its output; in backward it recomputes its blocks and runs their backward
            peak_b, acc = 0, 0
            for c in members:
                acc += c.kept
            running = acc
            for c in reversed(members):
                peak_b = max(peak_b, running + c.backward)
                running -= c.kept
            units.append((members[-1].output, max(c.forward for c in members), peak_b, True, 0))
            i = j
            continue
        if key == "stage_input":  # the activation received from the previous stage
            units.append((measured["stage_input"], 0, 0, False, 0))
        else:
            c = costs[key]
            units.append((c.kept, c.forward, c.backward, False, c.output))
        i += 1
    prefix, forward_peak = 0, 0
    prefixes = []
    for kept, fwd, *_ in units:
        forward_peak = max(forward_peak, prefix + fwd)
        prefixes.append(prefix)
        prefix += kept
    kept_total = prefix
    backward_peak = 0
    for (kept, _, bwd, recomputed, output), before in zip(units, prefixes):
        # a plain unit's kept bytes are part of what its backward starts from, less its output, which the
        # next region saved and freed in its own backward (the measurement held it); a recomputed group's
        # backward starts from the units before it (its own output is the next group's saved input)
        backward_peak = max(backward_peak, before + (0 if recomputed else kept - output) + bwd)
    single = max(forward_peak, backward_peak)
    return {"kept": in_flight * kept_total, "kept_per_micro_batch": kept_total,
            "peak": (in_flight - 1) * kept_total + single, "forward_peak": forward_peak,
            "backward_peak": backward_peak}


def saved_by_layer_type(measured: dict) -> dict:
    """Distinct storages saved for backward, summed over the stage's layers, by layer type."""
    out: dict[str, int] = {}
    for key in measured["sequence"]:
        if key == "stage_input":
            continue
        name = key if isinstance(key, str) else key[0]
        out[name] = out.get(name, 0) + measured["costs"][key].saved
    return dict(sorted(out.items()))

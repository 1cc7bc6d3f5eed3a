"""The pipeline stage one rank holds, built on the meta device: the stage bounds DeepSpeed's
`PipelineModule` gives (`pipe_partition_method`), a tensor-parallel view with a fake process group (so
megatron-core's layers and every mixer build exactly one rank's shard), and the stage's distinct
parameters and buffers. docs/memory-plan.md describes the accounting."""
from __future__ import annotations

import contextlib
import re

import torch

from neox_zoology.parallel.setup import Layout, layout_for


def layout_of(args, world_size: int | None = None) -> Layout:
    world = int(world_size if world_size is not None else args.world_size)
    return layout_for(world, args.tp, args.pp)


def stage_bounds(args, specs, param_counts: list[int] | None = None) -> list[tuple[int, int]]:
    """[start, stop) spec indices per pipeline stage, as DeepSpeed's PipelineModule partitions them."""
    from deepspeed.runtime import utils as ds_utils

    stages = args.pp
    if args.pipe_parallel_size < 1 or stages == 1:
        return [(0, len(specs))]
    method = args.pipe_partition_method.lower()
    if method == "uniform":
        parts = ds_utils.partition_uniform(num_items=len(specs), num_parts=stages)
    elif method == "parameters":
        parts = ds_utils.partition_balanced(weights=list(param_counts), num_parts=stages)
    elif method.startswith("type:"):
        pattern = re.compile(method.split(":", 1)[1], re.IGNORECASE)  # DeepSpeed: regex.search, same syntax
        weights = [1 if pattern.search(spec.typename.__name__) else 0 for spec in specs]
        if not any(weights):
            raise ValueError(f"pipe_partition_method {args.pipe_partition_method!r} matches no layer")
        parts = ds_utils.partition_balanced(weights=weights, num_parts=stages)
    else:
        raise ValueError(f"pipe_partition_method {args.pipe_partition_method!r} is not one DeepSpeed implements")
    parts = [int(p) for p in parts]
    return [(parts[i], parts[i + 1]) for i in range(stages)]


@contextlib.contextmanager
def tensor_parallel_view(tp: int):
    """Build and run modules as one rank of a TP group of size `tp`, without any communication.

    A fake process group (torch's `FakeProcessGroup`: collectives return at once) backs megatron-core's
    parallel state, so TP layers and mixers take their per-rank shapes; megatron-core's mappings allocate
    on `torch.cuda.current_device()`, pointed meanwhile at the device the measurement runs on (meta).
    """
    import torch.distributed as dist

    if tp == 1:
        yield
        return
    if dist.is_initialized():
        raise RuntimeError("the memory plan builds its own TP view and needs no process group to be running")
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    current_device = torch.cuda.current_device
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp)
    try:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, create_gloo_process_groups=False
        )
        torch.cuda.current_device = lambda: ALLOC_DEVICE[0]
        yield
    finally:
        torch.cuda.current_device = current_device
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def build_stage(specs, start: int, stop: int) -> list[tuple[torch.nn.Module, object]]:
    """The stage's (module, forward_fn) pairs, built on the meta device; a tied module is built once per
    stage, as PipelineModule builds it."""
    from deepspeed.pipe import TiedLayerSpec

    out, tied = [], {}
    with torch.device("meta"):
        for spec in specs[start:stop]:
            if isinstance(spec, TiedLayerSpec):
                if spec.key not in tied:
                    tied[spec.key] = spec.build()
                out.append((tied[spec.key], spec.forward_fn))
            else:
                out.append((spec.build(), None))
    return out


def distinct_parameters(stage) -> list[torch.nn.Parameter]:
    seen, params = set(), []
    for module, _ in stage:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def buffer_bytes(stage) -> int:
    seen, total = set(), 0
    for module, _ in stage:
        for b in module.buffers():
            if id(b) not in seen:
                seen.add(id(b))
                total += b.numel() * b.element_size()
    return total


ALLOC_DEVICE = [torch.device("meta")]
"""The device megatron-core's mappings allocate on while the plan runs (meta, or the CPU for a rebuild)."""


@contextlib.contextmanager
def alloc_device(device):
    ALLOC_DEVICE[0], previous = torch.device(device), ALLOC_DEVICE[0]
    try:
        yield
    finally:
        ALLOC_DEVICE[0] = previous

"""One place that brings up torch.distributed, megatron-core's parallel_state and DeepSpeed's topology.

megatron-core orders ranks TP fastest, then DP, then PP; DeepSpeed's
`PipeModelDataParallelTopology(num_pp, num_mp, num_dp)` orders axes pipe > data > model, i.e. the
same layout. `check_layout()` asserts the agreement at start-up rather than trusting it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from megatron.core import parallel_state

from neox_zoology.parallel import cpu_compat


@dataclass(frozen=True)
class Layout:
    world: int
    tp: int
    pp: int  # number of pipeline stages (1 when the plain engine is used)
    dp: int


def layout_for(world: int, tp: int, pp: int) -> Layout:
    if world % (tp * pp):
        raise ValueError(
            f"world size {world} is not divisible by model_parallel_size {tp} x pipe stages {pp}"
        )
    return Layout(world=world, tp=tp, pp=pp, dp=world // (tp * pp))


def init_distributed(backend: str | None = None) -> None:
    """Initialise torch.distributed through DeepSpeed (env:// rendezvous set by the launcher)."""
    import deepspeed

    cpu_compat.apply()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def init_model_parallel(tp: int, pp: int):
    """megatron-core groups + the matching DeepSpeed topology. Returns the topology."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    world = torch.distributed.get_world_size()
    lay = layout_for(world, tp, pp)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
    )
    topo = PipeModelDataParallelTopology(num_pp=lay.pp, num_mp=lay.tp, num_dp=lay.dp)
    check_layout(topo)
    return topo


def check_layout(topo) -> None:
    rank = torch.distributed.get_rank()
    coord = topo.get_coord(rank)
    ours = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
    )
    if (coord.pipe, coord.data, coord.model) != ours:
        raise RuntimeError(
            f"rank {rank}: DeepSpeed topology {coord} disagrees with megatron-core (pp, dp, tp)={ours}"
        )


def destroy() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


class MPU:
    """The `mpu` interface deepspeed.initialize expects, answered by megatron-core's parallel_state."""

    get_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(
        parallel_state.get_tensor_model_parallel_world_size
    )
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_data_parallel_rank = staticmethod(parallel_state.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(parallel_state.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(parallel_state.get_data_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(parallel_state.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(
        parallel_state.get_pipeline_model_parallel_world_size
    )
    get_pipeline_model_parallel_group = staticmethod(parallel_state.get_pipeline_model_parallel_group)

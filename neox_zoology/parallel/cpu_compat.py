"""CPU stand-ins for the few CUDA-only spots of megatron-core and DeepSpeed.

Applied only when CUDA is absent (`apply()` is a no-op on a GPU machine):
- megatron-core's RNG tracker keeps CUDA generator states; on CPU it keeps CPU generator states, so
  `get_cuda_rng_tracker().fork()` (dropout in TP regions) and `tensor_parallel.checkpoint` work.
- megatron-core's gather/scatter mappings allocate on `torch.cuda.current_device()`; on a machine
  without CUDA that is the CPU.
- DeepSpeed's `init_distributed` JIT-compiles a shared-memory all-reduce op on CPU (~35 s on every
  fresh machine) that only inference uses; it is skipped.
"""
from __future__ import annotations

import contextlib
import sys

import torch

_APPLIED = False


class CPURNGStatesTracker:
    """Named CPU generator states with megatron-core's tracker interface (add / fork / states)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.states_ = {}
        self.seeds_ = set()
        self._is_initialized = False

    def is_initialized(self):
        return self._is_initialized

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        if seed in self.seeds_ or name in self.states_:
            raise ValueError(f"RNG state {name!r} / seed {seed} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"RNG state {name!r} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def apply() -> None:
    global _APPLIED
    if _APPLIED or torch.cuda.is_available():
        return
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # tensor_parallel.checkpoint saves/restores "the CUDA state": on CPU that is the CPU state.
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    torch.cuda.current_device = lambda: torch.device("cpu")

    import deepspeed.comm.torch  # noqa: F401  (the module, not its `torch` attribute)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    _APPLIED = True


def model_parallel_seed(seed: int) -> None:
    """megatron-core's seeding: data-parallel state = seed, TP state = seed + 2718 + tp_rank."""
    from megatron.core.tensor_parallel import random as mrandom

    from neox_zoology.parallel.tp import tp_rank

    torch.manual_seed(seed)
    if torch.cuda.is_available():
        mrandom.model_parallel_cuda_manual_seed(seed)
        return
    apply()
    tracker = mrandom.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank())


def tp_region_rng(enabled: bool):
    """Fork megatron-core's model-parallel RNG (for dropout on TP-split tensors) when it is set up."""
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    if enabled and tracker is not None and tracker.is_initialized():
        return tracker.fork()
    return contextlib.nullcontext()

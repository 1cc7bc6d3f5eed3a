"""Throughput accounting and log sinks (console on rank 0, tensorboard when configured)."""
from __future__ import annotations

import os
import time

import torch

# Dense bf16 peak FLOP/s per device (vendor datasheets, without sparsity). The longest name contained
# in `torch.cuda.get_device_name()` wins ("NVIDIA H100 PCIe" is the PCIe card, "NVIDIA H100 80GB HBM3"
# the SXM one).
PEAK_BF16_FLOPS = {
    "H200 NVL": 835e12,
    "H200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L4": 121e12,
    "V100": 125e12,  # fp16 tensor cores (no bf16)
}


def device_peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    return peak_flops_for(torch.cuda.get_device_name())


def peak_flops_for(name: str) -> float | None:
    """Dense bf16 peak of the device called `name`, None when it is not in PEAK_BF16_FLOPS."""
    found = [key for key in PEAK_BF16_FLOPS if key in name]
    return PEAK_BF16_FLOPS[max(found, key=len)] if found else None


class Throughput:
    """tokens/s, TFLOP/s per rank and MFU over a window of steps."""

    def __init__(self, tokens_per_step: int, train_flops_per_token: float, world_size: int):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = train_flops_per_token
        self.world = world_size
        self.peak = device_peak_flops()
        self.reset()

    def reset(self):
        self.t0 = time.perf_counter()
        self.steps = 0

    def tick(self):
        self.steps += 1

    def read(self) -> dict:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        tps = self.tokens_per_step * self.steps / dt
        flops_rank = tps * self.flops_per_token / self.world
        return {
            "tokens_per_s": tps,
            "tflops_per_rank": flops_rank / 1e12,
            "mfu": flops_rank / self.peak if self.peak else None,
            "s_per_step": dt / max(self.steps, 1),
        }


class Logger:
    def __init__(self, args, rank: int):
        self.rank = rank
        self.writer = None
        self.file = None
        if rank == 0 and args.log_dir:
            os.makedirs(args.log_dir, exist_ok=True)
            self.file = open(os.path.join(args.log_dir, "train.log"), "a", buffering=1)
        if rank == 0 and args.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=args.tensorboard_dir)

    def info(self, msg: str):
        if self.rank == 0:
            print(msg, flush=True)
            if self.file is not None:
                self.file.write(msg + "\n")

    def scalars(self, step: int, values: dict, prefix: str = "train"):
        if self.writer is None:
            return
        for k, v in values.items():
            if v is not None:
                self.writer.add_scalar(f"{prefix}/{k}", float(v), step)
        self.writer.flush()

    def close(self):
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()

"""Bytes of parameters, gradients, optimizer state and the optimizer-step transient on one rank, by the
DeepSpeed optimizer wrapper that takes ours (deepspeed 0.19's `_do_optimizer_sanity_check`): the table
and its reasons are in docs/memory-plan.md."""
from __future__ import annotations

import math

DEFAULT_REDUCE_BUCKET = 500_000_000
"""DeepSpeed's default `zero_optimization.reduce_bucket_size` (elements)."""
DEFAULT_ALLREDUCE_BUCKET = 500_000_000
"""DeepSpeed's MEMORY_OPT_ALLREDUCE_SIZE: gradients are flattened this many elements at a time (ZeRO 0)."""


def zero_stage(args) -> int:
    z = args.zero_optimization if isinstance(args.zero_optimization, dict) else {}
    return int(z.get("stage", 0))


def engine_path(args) -> str:
    """Which DeepSpeed optimizer wraps ours (deepspeed 0.19's `_do_optimizer_sanity_check`)."""
    if zero_stage(args) > 0:
        return "zero"
    if args.dtype_name == "fp32":
        return "torch"
    if args.dtype_name == "bf16" and args.pipe_parallel_size >= 1:
        return "bf16_optimizer"
    return "fp16_unfused"


def state_bytes(args, n_params: int, largest_param: int, dp: int) -> dict:
    """Bytes of parameters, gradients, optimizer state and the optimizer-step transient (the table in
    docs/memory-plan.md)."""
    x = 4 if args.dtype_name == "fp32" else 2
    stage, path = zero_stage(args), engine_path(args)
    zcfg = args.zero_optimization if isinstance(args.zero_optimization, dict) else {}
    bucket = int(float(zcfg.get("reduce_bucket_size", DEFAULT_REDUCE_BUCKET)))
    contiguous = bool(zcfg.get("contiguous_gradients", True))
    part = math.ceil(n_params / dp)
    notes = []
    if path == "torch":
        grads, opt = 4 * n_params, 8 * n_params
        step = 4 * min(n_params, DEFAULT_ALLREDUCE_BUCKET + largest_param)
        what = "fp32 params and grads, Adam m, v (fp32)"
    elif path == "fp16_unfused":
        grads, opt = x * n_params, 12 * n_params
        step = 4 * n_params
        what = f"{args.dtype_name} params and grads; fp32 master copy + Adam m, v (DeepSpeed FP16_UnfusedOptimizer)"
    elif path == "bf16_optimizer":
        grads, opt = 2 * n_params + 2 * largest_param, 12 * part
        step = 4 * part
        what = "bf16 params and grad accumulation buffer; fp32 master + Adam m, v partitioned over DP (BF16_Optimizer)"
    else:
        bucket_bytes = x * bucket if contiguous else 0
        if stage == 1:
            grads = x * n_params + bucket_bytes
        else:
            grads = x * part + bucket_bytes + x * largest_param
        opt = 12 * part
        step = (x + 4) * part if x != 4 else 4 * part
        if args.pipe_parallel_size >= 1 and stage == 1:
            step += bucket_bytes
        what = (f"{args.dtype_name} params; {args.dtype_name} grads ({'whole' if stage == 1 else '1/DP'}) + "
                f"reduce bucket of {bucket:,} elements; fp32 master + Adam m, v partitioned over DP (ZeRO {stage})")
        if stage >= 2 and args.pipe_parallel_size >= 1:
            notes.append("DeepSpeed's pipeline engine refuses ZeRO 2 (pipe_parallel_size >= 1): use ZeRO 1 or "
                         "pipe_parallel_size 0")
    return {"parameters": x * n_params, "gradients": grads, "optimizer": opt, "step_transient": step,
            "accounting": what, "notes": notes}

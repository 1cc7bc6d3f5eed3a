"""Per-rank memory plan of a training config: parameters, gradients, optimizer state and activations.

`python train.py CONFIG... --dry-run [--world-size N]` prints it (see `dryrun.py`). Everything is in
bytes per rank, for the pipeline stage that needs the most; nothing is allocated: the stage is built
on the meta device with this rank's tensor-parallel shapes, and its activations are measured by running
one micro-batch forward and backward there.

Layout
------
TP = model_parallel_size, PP = max(1, pipe_parallel_size), DP = world_size / (TP x PP). The stage's
layers are the ones DeepSpeed's `PipelineModule` gives it (`pipe_partition_method`, `type:ZooBlock` by
default, through DeepSpeed's own `partition_balanced`): the embedding sits on stage 0 and the final norm
and LM head on the last stage; a tied head keeps its own copy of the embedding on the last stage (with
its gradient and optimizer state). With TP > 1 the stage is built with a fake process group of TP ranks
(torch's `FakeProcessGroup`, no communication), so megatron-core's Column/RowParallel layers, the
vocabulary-parallel embedding and every mixer build exactly the shard one rank holds: split weights
count 1/TP, replicated ones (norms, row-parallel biases, replicated filters) count whole.

Parameters, gradients, optimizer (P = parameters on this rank's stage, D = DP, X = bytes of the model
dtype: 2 for bf16/fp16, 4 for fp32; Adam/AdamW keep two fp32 moments m, v; "12" = fp32 master copy +
m + v). The DeepSpeed wrapper follows `DeepSpeedEngine._do_optimizer_sanity_check` of deepspeed 0.19
(`grad_accum_dtype` unset, so gradients accumulate in the model dtype):

========================================  ======  =================================  =========  ======================
engine path (optimizer wrapper)           params  gradients                          optimizer  optimizer-step transient
========================================  ======  =================================  =========  ======================
fp32, ZeRO 0 (torch AdamW as it is)       4 P     4 P                                8 P        4 P (flat all-reduce)
bf16/fp16, ZeRO 0 (FP16_UnfusedOptimizer) 2 P     2 P                                12 P       4 P (fp32 gradients)
bf16, ZeRO 0, pipeline (BF16_Optimizer)   2 P     2 P (bf16 accumulation buffer)     12 P / D   4 P / D (fp32 grads)
ZeRO 1 (DeepSpeedZeroOptimizer)           X P     X P + reduce bucket                12 P / D   (X + 4) P / D
ZeRO 2 (DeepSpeedZeroOptimizer)           X P     X P / D + bucket + one param's     12 P / D   (X + 4) P / D
========================================  ======  =================================  =========  ======================

fp16 under the pipeline engine also takes FP16_UnfusedOptimizer. BF16_Optimizer (bf16 + ZeRO 0 under the
pipeline engine) partitions its fp32 master and moments over DP like ZeRO 1, and frees each bf16 gradient
as soon as it is added to its buffer (one parameter's bf16 gradient in flight, counted). ZeRO 1 keeps
the whole low-precision `.grad` until the reduction at the accumulation boundary; at the step it
flattens this rank's partition and converts it to fp32 ((X + 4) P / D; 4 P / D in fp32, where the
conversion copies nothing). With ZeRO 0 and no wrapper, DeepSpeed all-reduces the gradients through a
flat copy of up to 5e8 elements, also on one rank.

The reduce bucket of ZeRO 1/2 is `zero_optimization.reduce_bucket_size` elements of the model dtype
(DeepSpeed's default 5e8: 1 GB in bf16, 2 GB in fp32), allocated whole during backward
(`contiguous_gradients`, on by default). Under the pipeline engine ZeRO 1 adds a second one when it
reduces (after the last backward: counted in the step transient). The torch AdamW is `fused` on CUDA
(`engine.make_optimizer`), so the update itself needs no temporaries. ZeRO 2 is refused by DeepSpeed's
pipeline engine (pipe_parallel_size >= 1); the plan says so.

Activations
-----------
Measured, not written down per mixer. One block of each distinct kind on the stage (layer type and
per-layer arguments, e.g. BaseConv's alternating short and long filters), with the embedding before
them (stage 0) and the final norm, LM head and `lm_loss` after them (last stage), runs one micro-batch
forward and then backward, region by region, on the meta device in the compute dtype (parameters cast
as DeepSpeed casts them; buffers stay fp32), under
- `torch.autograd.graph.saved_tensors_hooks`: the distinct storages autograd keeps for backward
  (parameters excluded), reported per layer type, and
- `LiveStorages`, a dispatch mode that follows every storage the ops allocate until it is freed: per
  region, the bytes still alive after the forward (what the micro-batch keeps for its backward) and
  the highest totals during its forward and during its backward.
The stage is composed from these: kept bytes summed over its layers; the activation peak is the
largest of (everything kept before a layer + its forward peak) and (everything kept up to a layer +
its backward peak), e.g. the LM head's [tokens, vocab] gradients on top of every block's kept
activations. (The tests check the composition against one forward and backward of a whole model.)
Activation checkpointing is composed as the engines run it: groups of `checkpoint_num_layers` blocks
under the plain engine (`SequentialGPT`), every block on its own under the pipeline engine
(`ZooBlock.recompute`); a group keeps only its input (the previous group's output) and in backward
recomputes its blocks' kept activations and runs their backward. The chunked LM head
(`lm_head_chunk_tokens > 0`) is run as the model runs it, so only one chunk's logits ever exist.
A block the meta device cannot run (a sparse layer whose selection reads values: random draws, top-k
counts) runs for real on the CPU at micro-batch 1 and is scaled to the micro-batch (programmatic
selection at its worst case: every position selected).

Kernel choice follows the target device, not the meta device (whose `scaled_dot_product_attention`
falls back to the math path and keeps the [heads, L, L] probabilities): on CUDA, attention is the fused
flash kernel (bf16/fp16, no mask) or the memory-efficient kernel (fp32 or a sliding-window mask), both
keeping q, k, v, the output and a [b, heads, L] log-sum-exp (the efficient kernel also its additive
mask); `nn.RMSNorm` is torch's fused `_fused_rms_norm`, keeping its input and a [tokens, 1] fp32 rstd.
On CPU (the `target="cpu"` plan that `bench/memory_plan.py` checks against a real run) attention is
torch's CPU flash kernel (same saved tensors) and RMSNorm the composite formula, as the meta device
computes it. FlashFFTConv (optional, CUDA) is not modelled: FFT convolutions are counted as
`fftconv._FFTConv` keeps them (two fp32 spectra).

Under the pipeline engine stage s keeps the activations of min(PP - s, gradient_accumulation_steps)
micro-batches (1F1B); the peak adds one micro-batch's backward on top of the others it keeps.

Peak and fit
------------
peak = params + gradients + optimizer + max(activation peak, step transient) + runtime reserve, where
the gradients are counted whole during the forward and backward (true from the second micro-batch of a
step on, i.e. with gradient accumulation; one micro-batch per step peaks up to one gradient buffer
lower) and the step transient follows the table above. The runtime reserve (2 GiB) stands for the CUDA
context, NCCL and cuBLAS workspaces and caching-allocator fragmentation. A "40 GB" GPU is taken as the
39.5 GiB an A100 40GB reports as its total, an "80 GB" one as the 79.3 GiB of an A100 80GB (an H100
80GB reports a little more). The largest micro-batch that fits scales the activations in proportion to
the micro-batch (measured: linear to within a percent), with and without activation checkpointing.
"""
from __future__ import annotations

import contextlib
import math
import re
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from neox_zoology import registry

GIB = 1 << 30
GPUS = (("40 GB", int(39.5 * GIB)), ("80 GB", int(79.3 * GIB)))
"""GPU classes the plan is checked against: (name, usable bytes as torch reports the device's total)."""
RUNTIME_RESERVE = 2 * GIB
"""CUDA context, NCCL/cuBLAS workspaces and allocator fragmentation (not in the counted tensors)."""
DEFAULT_REDUCE_BUCKET = 500_000_000
"""DeepSpeed's default `zero_optimization.reduce_bucket_size` (elements)."""
DEFAULT_ALLREDUCE_BUCKET = 500_000_000
"""DeepSpeed's MEMORY_OPT_ALLREDUCE_SIZE: gradients are flattened this many elements at a time (ZeRO 0)."""

LOW_PRECISION = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Layout:
    world: int
    tp: int
    pp: int
    dp: int


def layout_of(args, world_size: int | None = None) -> Layout:
    world = int(world_size if world_size is not None else args.world_size)
    tp, pp = args.tp, args.pp
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not a multiple of model_parallel_size {tp} x pipeline stages {pp}")
    return Layout(world=world, tp=tp, pp=pp, dp=world // (tp * pp))


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
        torch.cuda.current_device = lambda: _ALLOC_DEVICE[0]
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


# ------------------------------------------------------------------ parameters, gradients, optimizer
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
    """Bytes of parameters, gradients, optimizer state and the optimizer-step transient (see module doc)."""
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


# --------------------------------------------------------------------------------- activations
class LiveStorages(TorchDispatchMode):
    """Follows every storage an op allocates until its last tensor dies: live bytes and their peak.

    Storages that existed before (parameters, inputs made outside) are never counted, nor are views of
    them. Works on the meta device, where nothing is really allocated.
    """

    def __init__(self):
        super().__init__()
        self.refs: dict[int, int] = {}
        self.size: dict[int, int] = {}
        self.owner: dict[int, str] = {}
        self.outside: set[int] = set()
        self.live = 0
        self.peak = 0
        self.region = ""

    def reset_peak(self) -> None:
        self.peak = self.live

    def live_by_region(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for key, n in self.size.items():
            out[self.owner[key]] = out.get(self.owner[key], 0) + n
        return out

    def _release(self, key: int) -> None:
        n = self.refs.get(key)
        if n is None:
            return
        if n > 1:
            self.refs[key] = n - 1
            return
        del self.refs[key]
        self.owner.pop(key, None)
        self.live -= self.size.pop(key)

    def track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.outside:
            return
        if key not in self.refs:
            self.refs[key] = 0
            self.size[key] = storage.nbytes()
            self.owner[key] = self.region
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self.refs[key] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_flatten

        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in self.refs:
                self.outside.add(t.untyped_storage()._cdata)
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


class _FusedRMSNormSaves(torch.autograd.Function):
    """RMSNorm keeping for backward what torch's CUDA `_fused_rms_norm` keeps: the input, the weight and
    an fp32 rstd per row (the composite formula, which the CPU and meta devices run, keeps fp32 copies)."""

    @staticmethod
    def forward(ctx, x, weight, reduced_dims: int, eps):
        dims = tuple(range(x.dim() - reduced_dims, x.dim()))
        xf = x.float()
        eps = torch.finfo(torch.float32).eps if eps is None else eps
        rstd = torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + eps)
        out = (xf * rstd).to(x.dtype)
        if weight is not None:
            out = out * weight
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):  # shapes and dtypes only: the plan never needs the values
        x, weight, _ = ctx.saved_tensors
        return torch.empty_like(x), (torch.empty_like(weight) if weight is not None else None), None, None


@contextlib.contextmanager
def target_kernels(target: str):
    """On the meta device, pick the kernels the target device would run (see the module docstring)."""
    import torch.nn.functional as F

    sdpa, rms_norm = F.scaled_dot_product_attention, F.rms_norm

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if query.device.type != "meta" or kw.get("enable_gqa"):
            return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, **kw)
        bias = attn_mask
        if bias is not None and bias.dtype == torch.bool:  # as SDPA does: boolean mask -> additive bias
            bias = torch.zeros(bias.shape, dtype=query.dtype, device=query.device).masked_fill_(~bias, -math.inf)
        if target == "cpu":
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, dropout_p, is_causal, attn_mask=bias, scale=scale)[0]
        if bias is None and query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] <= 256:
            return torch.ops.aten._scaled_dot_product_flash_attention(
                query, key, value, dropout_p, is_causal, False, scale=scale)[0]
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, bias, True, dropout_p, is_causal, scale=scale)[0]

    def fused_rms_norm(x, normalized_shape, weight=None, eps=None):
        if weight is not None and weight.dtype != x.dtype:  # torch itself falls back to the composite here
            return rms_norm(x, normalized_shape, weight, eps)
        return _FusedRMSNormSaves.apply(x, weight, len(normalized_shape), eps)

    F.scaled_dot_product_attention = attention
    if target == "cuda":
        F.rms_norm = fused_rms_norm
    try:
        yield
    finally:
        F.scaled_dot_product_attention, F.rms_norm = sdpa, rms_norm


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


_ALLOC_DEVICE = [torch.device("meta")]


@contextlib.contextmanager
def _alloc_device(device):
    _ALLOC_DEVICE[0], previous = torch.device(device), _ALLOC_DEVICE[0]
    try:
        yield
    finally:
        _ALLOC_DEVICE[0] = previous


def measure_regions(args, regions, first: bool, micro_batch: int, target: str,
                    device: str = "meta") -> list[RegionCost]:
    """Run `regions` (each a list of (module, forward_fn); the last may end with the loss, marked by
    label "head") as one chain, forward then backward region by region, on `device`; returns their costs.

    Every region's hidden-state input is a detached alias of the previous output (same storage), so each
    backward can be timed on its own; the storages and their owners are those of the undivided model.
    """
    from neox_zoology.model.gpt import lm_loss

    dtype = LOW_PRECISION[args.dtype_name]
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
        key = t.untyped_storage()._cdata
        if recording[0] and key not in keys_outside:
            if key not in saved_alive:
                saved.append((mode.region, t.untyped_storage().nbytes()))
            saved_alive[key] = saved_alive.get(key, 0) + 1
            weakref.finalize(t, forget, key)
        return t

    costs = [RegionCost(label, where=device) for label, _ in regions]
    records = []
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with _alloc_device(device), target_kernels(target), mode, hooks:
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
    itemsize = LOW_PRECISION[args.dtype_name].itemsize
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
    units = []  # (bytes the unit keeps, its forward peak above them, its backward peak, recomputed?)
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
            units.append((members[-1].output, max(c.forward for c in members), peak_b, True))
            i = j
            continue
        if key == "stage_input":  # the activation received from the previous stage
            units.append((measured["stage_input"], 0, 0, False))
        else:
            c = costs[key]
            units.append((c.kept, c.forward, c.backward, False))
        i += 1
    prefix, forward_peak = 0, 0
    prefixes = []
    for kept, fwd, _, _ in units:
        forward_peak = max(forward_peak, prefix + fwd)
        prefixes.append(prefix)
        prefix += kept
    kept_total = prefix
    backward_peak = 0
    for (kept, _, bwd, recomputed), before in zip(units, prefixes):
        # a plain unit's kept bytes are part of what its backward starts from; a recomputed group's
        # backward starts from the units before it (its own output is the next group's saved input)
        backward_peak = max(backward_peak, before + (0 if recomputed else kept) + bwd)
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


# ------------------------------------------------------------------------------------- the plan
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

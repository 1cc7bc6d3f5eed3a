"""What the activations of a forward and backward cost, followed without allocating: `LiveStorages`, a
dispatch mode that follows every storage the ops allocate until it is freed, and `target_kernels`, which
makes the meta device keep what the target device's kernels keep (flash/efficient attention, torch's
fused RMSNorm on CUDA; torch's CPU kernels on the CPU). docs/memory-plan.md says what is modelled."""
from __future__ import annotations

import contextlib
import math
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


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
    """On the meta device, pick the kernels the target device would run (docs/memory-plan.md, Activations)."""
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

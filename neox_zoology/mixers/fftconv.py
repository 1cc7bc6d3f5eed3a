"""The shared causal FFT convolution.

y[..., t] = sum_{j<=t} k[..., j] * u[..., t-j], computed as irfft(rfft(u, n) * rfft(k, n))[:L] with
n >= 2L (no circular wrap-around). FFTs always run in fp32 (torch.fft refuses bf16 on CPU, and bf16
FFTs lose too much precision on GPU); inputs and outputs keep their dtype. The filter's FFT is taken
once per call and broadcast over the batch. FlashFFTConv is used when importable on CUDA.
"""
from __future__ import annotations

import functools

import torch

try:  # optional CUDA fast path
    from flashfftconv import FlashFFTConv  # type: ignore
except Exception:  # noqa: BLE001 - any import failure means "not available"
    FlashFFTConv = None


@functools.lru_cache(maxsize=None)
def fast_fft_size(n: int) -> int:
    """Smallest even 7-smooth number >= n: sizes pocketfft and cuFFT factor into fast radices.

    (Rounding further to 5-smooth sizes was measured slower on CPU: 4320 vs 4200 at L = 2100.)
    """
    m = max(2, n + (n % 2))
    while True:
        r = m
        for p in (2, 3, 5, 7):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 2


def fft_causal_conv(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Causal convolution of u [..., d, L] with per-channel filters k [d, Lk] (Lk <= L)."""
    L = u.shape[-1]
    if k.shape[-1] > L:
        raise ValueError(f"filter length {k.shape[-1]} exceeds the sequence length {L}")
    if FlashFFTConv is not None and u.is_cuda and u.dim() == 3:
        return _flash(u, k)
    return _FFTConv.apply(u, k)


class _FFTConv(torch.autograd.Function):
    """Forward: 2 rfft + 1 irfft; backward: 1 rfft + 2 irfft, with the padding done inside the FFTs.

    Saves the two spectra and returns a compact [..., L] output: autograd through the plain formula
    would keep the whole [..., n] irfft buffer alive behind the sliced output and build a zero-padded
    [..., n] gradient for it in backward.
    """

    @staticmethod
    def forward(ctx, u, k):
        L, Lk = u.shape[-1], k.shape[-1]
        n = fast_fft_size(L + Lk)
        u_f = torch.fft.rfft(u.float(), n=n)
        k_f = torch.fft.rfft(k.float(), n=n)
        ctx.save_for_backward(u_f, k_f)
        ctx.shapes = (L, Lk, n, u.dtype, k.dtype, u.dim() - k.dim())
        return torch.fft.irfft(u_f * k_f, n=n)[..., :L].to(u.dtype).contiguous()

    @staticmethod
    def backward(ctx, grad):
        u_f, k_f = ctx.saved_tensors
        L, Lk, n, u_dtype, k_dtype, batch_dims = ctx.shapes
        g_f = torch.fft.rfft(grad.float(), n=n)
        grad_u = grad_k = None
        if ctx.needs_input_grad[0]:  # correlation with k: sum_t g[t] k[t - s]
            grad_u = torch.fft.irfft(g_f * k_f.conj(), n=n)[..., :L].to(u_dtype)
        if ctx.needs_input_grad[1]:  # correlation with u, summed over the batch: sum_t g[t] u[t - j]
            prod = g_f * u_f.conj()
            if batch_dims:
                prod = prod.sum(dim=tuple(range(batch_dims)))
            grad_k = torch.fft.irfft(prod, n=n)[..., :Lk].to(k_dtype)
        return grad_u, grad_k


@functools.lru_cache(maxsize=8)
def _flash_module(seqlen: int, dtype: torch.dtype, device: torch.device):
    return FlashFFTConv(seqlen, dtype=dtype).to(device)


def _flash(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    L = u.shape[-1]
    size = max(16, 2 * (1 << (L - 1).bit_length()))  # FlashFFTConv's FFT size for length L
    dtype = u.dtype if u.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    mod = _flash_module(size, dtype, u.device)
    kk = torch.nn.functional.pad(k.float(), (0, L - k.shape[-1]))
    return mod(u.to(dtype).contiguous(), kk).to(u.dtype)

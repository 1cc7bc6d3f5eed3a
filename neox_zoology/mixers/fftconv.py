"""The shared causal FFT convolution.

y[..., t] = sum_{j<=t} k[..., j] * u[..., t-j], computed as irfft(rfft(u, n) * rfft(k, n))[:L] with
n >= 2L (no circular wrap-around). FFTs run in fp32 for fp32 and half-precision inputs (torch.fft
refuses bf16 on CPU, and bf16 FFTs lose too much precision on GPU) and in fp64 when an operand is fp64;
inputs and outputs keep their dtype. The filter's FFT is taken
once per call and broadcast over the batch.

FlashFFTConv (optional, CUDA) is used when importable for fp16/bf16 inputs [b, d, L] on CUDA whose
shape its kernels support (`flash_fft_size`). Its FFTs are tensor-core matmuls on half-precision
operands (fp32 accumulation): with it installed, bf16 training trades the fp32 FFT for its speed.
fp32 inputs always take the fp32 torch path (they are never cast down).
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


def fft_causal_conv(u: torch.Tensor, k: torch.Tensor, skip=None) -> torch.Tensor:
    """Causal convolution of u [..., d, L] with per-channel filters k [d, Lk] (Lk <= L), plus `skip` * u.

    `skip` (a per-channel [d] tensor or a number) is folded into the filter's first tap,
    k'_0 = k_0 + skip, which is the same sum: one convolution instead of a convolution, a product
    and an add (and their gradients).
    """
    L = u.shape[-1]
    if k.shape[-1] > L:
        raise ValueError(f"filter length {k.shape[-1]} exceeds the sequence length {L}")
    if skip is not None:  # in >= fp32 (the FFT's precision), so a small k_0 is not rounded away next to skip
        k = k.to(torch.promote_types(k.dtype, torch.float32))
        skip = skip.to(k.dtype)[:, None] if torch.is_tensor(skip) else torch.full_like(k[:, :1], float(skip))
        k = torch.cat([k[:, :1] + skip, k[:, 1:]], dim=-1)
    if FlashFFTConv is not None and u.is_cuda and u.dim() == 3:
        size = flash_fft_size(L, u.shape[1], u.dtype)
        if size is not None:
            return _flash(u, k, size)
    return _FFTConv.apply(u, k)


def causal_conv_step(history: torch.Tensor, u: torch.Tensor, k: torch.Tensor, skip=None):
    """One more output of `fft_causal_conv`: history [b, c, t] (the inputs so far), u [b, c] the input at t,
    k [c, >= t + 1] the filter -> (y [b, c], history [b, c, t + 1]). A direct sum: O(t) per position."""
    hist = torch.cat([history, u[..., None]], -1)
    t = hist.shape[-1]
    if k.shape[-1] < t:
        raise ValueError(f"position {t - 1} is past the long filter's {k.shape[-1]} positions (the model's "
                         f"seq_length): a long convolution decodes at most seq_length positions")
    y = (hist * k[:, :t].flip(-1).to(hist.dtype)).sum(-1)
    if skip is not None:
        y = y + (skip.to(u.dtype) if torch.is_tensor(skip) else skip) * u
    return y, hist


def flash_fft_size(L: int, channels: int, dtype: torch.dtype) -> int | None:
    """FlashFFTConv's FFT size for a causal convolution of length L, or None where it does not apply.

    Its documented input requirements: fp16/bf16 only (fp32 inputs keep the fp32 torch FFT instead of
    being cast down), a power-of-two FFT size in [256, 4M] (here the smallest >= 2L, so no
    wrap-around), L even and a multiple of 4 at FFT sizes 512 and 2048, channels a multiple of 16 above
    FFT size 32768.
    """
    if dtype not in (torch.float16, torch.bfloat16) or L < 2 or L % 2:
        return None
    size = max(256, 1 << (2 * L - 1).bit_length())
    if size > 1 << 22 or (size in (512, 2048) and L % 4) or (size > 32768 and channels % 16):
        return None
    return size


def fft_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The real dtype an FFT over these tensors runs in: fp32, or fp64 when one of them is fp64."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


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
        real = fft_dtype(u, k)
        u_f = torch.fft.rfft(u.to(real), n=n)
        k_f = torch.fft.rfft(k.to(real), n=n)
        ctx.save_for_backward(u_f, k_f)
        ctx.shapes = (L, Lk, n, u.dtype, k.dtype, u.dim() - k.dim(), real)
        return torch.fft.irfft(u_f * k_f, n=n)[..., :L].to(u.dtype).contiguous()

    @staticmethod
    def backward(ctx, grad):
        u_f, k_f = ctx.saved_tensors
        L, Lk, n, u_dtype, k_dtype, batch_dims, real = ctx.shapes
        g_f = torch.fft.rfft(grad.to(real), n=n)
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


def _flash(u: torch.Tensor, k: torch.Tensor, size: int) -> torch.Tensor:
    """u [b, d, L] in fp16/bf16 (contiguous, as FlashFFTConv requires), k [d, Lk] as an fp32 [d, L] filter."""
    L = u.shape[-1]
    mod = _flash_module(size, u.dtype, u.device)
    kk = torch.nn.functional.pad(k.float(), (0, L - k.shape[-1]))
    return mod(u.contiguous(), kk).to(u.dtype)

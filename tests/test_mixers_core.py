"""attention / sliding_window / baseconv: plain references, causality, TP=2 == TP=1."""
import math

import pytest
import torch
import torch.nn.functional as F

import neox_zoology
from dist import gather_tp_grad, init_tp, run_ranks
from properties import assert_causal

D, L, HEADS = 32, 24, 4


def direct_causal_conv(u, k):
    """y[..., t] = sum_{j<=t} k[..., j] u[..., t-j], written out as an O(L^2) loop."""
    L = u.shape[-1]
    y = torch.zeros_like(u)
    for t in range(L):
        for j in range(min(t + 1, k.shape[-1])):
            y[..., t] += k[..., j] * u[..., t - j]
    return y


def dense_attention_reference(mixer, x, window=0):
    """Per-head softmax(QK^T / sqrt(dh) + mask) V with an explicit mask, from the mixer's own weights."""
    attn = mixer.mixer
    s, b, _ = x.shape
    dh = attn.head_dim
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).view(s, b, attn.local_heads, 3, dh)
    q, k, v = [qkv[:, :, :, i].permute(1, 2, 0, 3) for i in range(3)]
    q, k = attn.rotary(q), attn.rotary(k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
    i = torch.arange(s)[:, None]
    j = torch.arange(s)[None, :]
    allowed = (j <= i) & ((j > i - window) if window > 0 else True)
    scores = scores.masked_fill(~allowed, float("-inf"))
    o = (scores.softmax(-1) @ v).permute(2, 0, 1, 3).reshape(s, b, -1)
    return F.linear(o, attn.out.weight, attn.out.bias)


@pytest.mark.parametrize("name,window", [("attention", 0), ("sliding_window", 5)])
def test_attention_matches_dense_masked_reference(name, window):
    torch.manual_seed(0)
    m = neox_zoology.build_mixer(name, hidden_size=D, seq_length=L, num_attention_heads=HEADS, batch_first=False,
                                 **({"window": window} if window else {}))
    x = torch.randn(L, 2, D)
    torch.testing.assert_close(m(x), dense_attention_reference(m, x, window), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer_index,kind,fft_skip", [(0, "short", True), (1, "implicit", True),
                                                         (1, "implicit", False)])
def test_baseconv_matches_direct_convolution(layer_index, kind, fft_skip):
    """Short filter: Conv1d taps, never a skip; long filter: k * u, plus u with `fft_skip` (the default)."""
    torch.manual_seed(0)
    m = neox_zoology.build_mixer("baseconv", hidden_size=D, seq_length=L, layer_index=layer_index, batch_first=False,
                                 fft_skip=fft_skip)
    bc = m.mixer
    x = torch.randn(L, 2, D)
    u = x.permute(1, 2, 0)  # [b, d, L]
    if kind == "short":
        k = bc.filter.weight[:, 0, :].flip(-1)  # Conv1d correlates: tap j of the causal filter is w[k-1-j]
        conv = direct_causal_conv(u, k) + bc.filter.bias[None, :, None]
    else:
        conv = direct_causal_conv(u, bc.filter(L)) + (u if fft_skip else 0)
    gate = F.linear(x, bc.proj.weight, bc.proj.bias).permute(1, 2, 0)
    ref = (conv * gate + u).permute(2, 0, 1)
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)


def test_baseconv_explicit_long_filter_has_the_fft_skip_by_default():
    torch.manual_seed(0)
    m = neox_zoology.build_mixer("baseconv", hidden_size=D, seq_length=L, kernel_sizes=[-1], long_filter="explicit",
                                 batch_first=False)
    bc = m.mixer
    x = torch.randn(L, 2, D)
    u = x.permute(1, 2, 0)
    conv = direct_causal_conv(u, bc.filter.weight) + u  # Zoology's hard-wired skip
    gate = F.linear(x, bc.proj.weight, bc.proj.bias).permute(1, 2, 0)
    torch.testing.assert_close(m(x), (conv * gate + u).permute(2, 0, 1), atol=1e-4, rtol=1e-5)


CASES = [
    ("attention", {}, 0), ("sliding_window", {"window": 5}, 0),
    ("baseconv", {}, 0), ("baseconv", {}, 1), ("baseconv", {"kernel_sizes": [-1], "long_filter": "explicit"}, 0),
    ("baseconv", {"fft_skip": False, "filter_init": "kaiming_uniform"}, 1),
]


@pytest.mark.parametrize("name,kw,layer_index", CASES)
@pytest.mark.parametrize("train", [True, False])
def test_causal(name, kw, layer_index, train):
    torch.manual_seed(0)
    m = neox_zoology.build_mixer(name, hidden_size=D, seq_length=L, num_attention_heads=HEADS,
                                 layer_index=layer_index, **kw)
    m.train(train)
    assert_causal(m, torch.randn(2, L, D), 10, lambda a, b: torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5))


def _mixer_tp_run(rank, tp, name, kw, layer_index):
    if tp > 1:
        init_tp(tp)
    torch.manual_seed(0)
    x = torch.randn(L, 2, D, requires_grad=True)
    torch.manual_seed(1)
    m = neox_zoology.build_mixer(name, hidden_size=D, seq_length=L, num_attention_heads=HEADS,
                                 layer_index=layer_index, batch_first=False, **kw)
    y = m(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = {n: gather_tp_grad(p) for n, p in m.named_parameters()}
    return y.detach(), x.grad.detach(), grads


@pytest.mark.parametrize("name,kw,layer_index", CASES)
def test_tp2_equals_tp1(name, kw, layer_index):
    (y1, gx1, g1), = run_ranks(_mixer_tp_run, 1, 1, name, kw, layer_index)
    outs = run_ranks(_mixer_tp_run, 2, 2, name, kw, layer_index)
    for y2, gx2, g2 in outs:
        torch.testing.assert_close(y2, y1, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gx2, gx1, atol=1e-5, rtol=1e-5)
        assert g2.keys() == g1.keys()
        for n in g1:
            torch.testing.assert_close(g2[n], g1[n], atol=1e-5, rtol=1e-5, msg=n)


def test_fft_size_is_the_smallest_even_7_smooth_size():
    from neox_zoology.mixers.fftconv import fast_fft_size

    def smooth(m):
        for p in (2, 3, 5, 7):
            while m % p == 0:
                m //= p
        return m == 1

    for n in (2, 3, 17, 2048, 4097, 4200, 4201, 32768):
        got = fast_fft_size(n)
        assert got >= n and got % 2 == 0 and smooth(got)
        assert not any(m % 2 == 0 and smooth(m) for m in range(n, got))
    assert fast_fft_size(4200) == 4200


@pytest.mark.parametrize("batch_shape,L,Lk", [((), 13, 13), ((2,), 24, 5), ((2, 3), 37, 37), ((3,), 29, 1)])
def test_fft_causal_conv_values_and_gradients_match_direct_convolution(batch_shape, L, Lk):
    """Forward and both input gradients of the custom-backward FFT conv against the O(L^2) loop in float64."""
    from neox_zoology.mixers.fftconv import fft_causal_conv

    torch.manual_seed(L)
    u = torch.randn(*batch_shape, 4, L, requires_grad=True)
    k = torch.randn(4, Lk, requires_grad=True)
    g = torch.randn(*batch_shape, 4, L)
    y = fft_causal_conv(u, k)
    assert y.shape == u.shape and y.dtype == torch.float32 and y.is_contiguous()
    (y * g).sum().backward()
    u64, k64 = u.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    ref = direct_causal_conv(u64, k64)
    (ref * g.double()).sum().backward()
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(u.grad.double(), u64.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k.grad.double(), k64.grad, atol=1e-5 * max(1, math.prod(batch_shape)), rtol=1e-5)


@pytest.mark.parametrize("skip", ["channels", "scalar"])
def test_fft_causal_conv_skip_is_k_times_u_plus_skip_times_u(skip):
    """`skip` is folded into the first tap: the same values and gradients as k * u + skip * u, in float64."""
    from neox_zoology.mixers.fftconv import fft_causal_conv

    torch.manual_seed(0)
    u = torch.randn(2, 4, 19, dtype=torch.float64, requires_grad=True)
    k = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    D = torch.randn(4, dtype=torch.float64, requires_grad=True) if skip == "channels" else 1.0
    g = torch.randn(2, 4, 19, dtype=torch.float64)
    y = fft_causal_conv(u, k, skip=D)
    ref = direct_causal_conv(u, k) + (D[:, None] if skip == "channels" else D) * u
    leaves = [u, k] + ([D] if skip == "channels" else [])
    grads = torch.autograd.grad((y * g).sum(), leaves)
    ref_grads = torch.autograd.grad((ref * g).sum(), leaves)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=1e-10)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_fft_causal_conv_keeps_bf16_in_and_out_with_fp32_inside():
    from neox_zoology.mixers.fftconv import fft_causal_conv

    torch.manual_seed(0)
    u = torch.randn(2, 4, 30).bfloat16().requires_grad_()
    k = torch.randn(4, 30).bfloat16().requires_grad_()
    y = fft_causal_conv(u, k)
    y.float().sum().backward()
    assert y.dtype == u.grad.dtype == k.grad.dtype == torch.bfloat16
    ref = direct_causal_conv(u.detach().double(), k.detach().double())  # the bf16 inputs, exact products
    torch.testing.assert_close(y.double(), ref, atol=0.05 * ref.abs().max().item(), rtol=1e-2)

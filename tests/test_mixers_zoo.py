"""hyena / h3 / rwkv / long_conv: plain references, causality, TP=2 == TP=1, validation, sizes."""
import math

import pytest
import torch
import torch.nn.functional as F

import neox_zoology
from dist import gather_tp_grad, init_tp, run_ranks
from properties import assert_causal
from neox_zoology import flops, registry
from neox_zoology.mixers.rwkv import ChannelMix, wkv
from neox_zoology.model.tconfig import transformer_config

D, L = 32, 24


def assert_rel_close(actual, expected, rel=1e-5, msg=None):
    """Elementwise |a - e| <= rel * (max|e| + |e|): tolerances scale with the tensor (outputs here are ~1e-2)."""
    torch.testing.assert_close(actual, expected, atol=rel * expected.abs().max().item() + 1e-12, rtol=rel, msg=msg)


def direct_causal_conv(u, k):
    """y[..., t] = sum_{j<=t} k[..., j] u[..., t-j], written out as an O(L^2) loop."""
    y = torch.zeros_like(u)
    for t in range(u.shape[-1]):
        for j in range(min(t + 1, k.shape[-1])):
            y[..., t] += k[..., j] * u[..., t - j]
    return y


def build(name, seq_length=L, **kw):
    return neox_zoology.build_mixer(name, hidden_size=D, seq_length=seq_length, num_attention_heads=4,
                                    batch_first=False, **kw)


# ------------------------------------------------------------------------------------------- hyena


def hyena_filter_reference(f, L, seq_length, emb_dim, modulate=True):
    """The implicit filter from its definition: positional features -> Sin MLP -> decay window."""
    bands = (emb_dim - 1) // 2
    n = torch.arange(seq_length, dtype=torch.float32)[:, None]
    freqs = torch.linspace(1e-4, bands - 1, bands)[None, :]
    angle = 2 * math.pi * n * freqs / seq_length
    t = torch.linspace(0, 1, seq_length)[:, None]
    h = torch.cat([t, torch.cos(angle), -torch.sin(angle)], dim=-1)[:L]
    for lin in f.inner:
        h = torch.sin(f.sin.freq * (h @ lin.weight.T + lin.bias))
    h = h @ f.out_weight.T
    d = h.shape[-1]
    if modulate:
        deltas = torch.linspace(math.log(1e-2) / 1.5, math.log(1e-2) / 0.3, d)
        h = h * torch.exp(-t[:L] * deltas.abs())
    return h.T


@pytest.mark.parametrize("emb_dim,modulate,length", [(3, True, L), (5, False, L), (3, True, L - 7)])
def test_hyena_filter_matches_its_definition(emb_dim, modulate, length):
    torch.manual_seed(0)
    f = build("hyena", emb_dim=emb_dim, modulate=modulate, filter_order=16).mixer.filter
    assert_rel_close(f(length), hyena_filter_reference(f, length, L, emb_dim, modulate))


def hyena_reference(hy, x):
    u = F.linear(x, hy.in_proj.weight, hy.in_proj.bias).permute(1, 2, 0)  # [b, 3d, L], rows (channel, stream)
    taps = hy.short_filter.weight[:, 0, :].flip(-1)  # Conv1d correlates: causal tap j is w[k-1-j]
    u = direct_causal_conv(u, taps) + hy.short_filter.bias[None, :, None]
    x1, x2, v = u[:, 0::3], u[:, 1::3], u[:, 2::3]
    v = v * x1
    v = direct_causal_conv(v, hy.filter(x.shape[0])) + hy.D[None, :, None] * v
    return F.linear((v * x2).permute(2, 0, 1), hy.out_proj.weight, hy.out_proj.bias)


@pytest.mark.parametrize("kw", [{}, {"short_filter_order": 5, "filter_order": 8, "w": 14.0}])
def test_hyena_matches_direct_convolution(kw):
    torch.manual_seed(0)
    m = build("hyena", **kw)
    x = torch.randn(L, 2, D)
    assert_rel_close(m(x), hyena_reference(m.mixer, x))


# ---------------------------------------------------------------------------------------------- h3


def h3_discrete(ssm, discretization):
    """(z, B_bar, C) of the diagonal SSM in float64: x(t) = z x(t-1) + B_bar u(t), y(t) = 2 Re(C x(t))."""
    dt = ssm.log_dt.double().exp()[:, None]
    A = torch.complex(-ssm.log_A_real.double().exp(), ssm.A_imag.double())
    B = torch.view_as_complex(ssm.B.double().contiguous()) if ssm.B is not None else torch.ones_like(A)
    if discretization == "zoh":
        z, B_bar = torch.exp(dt * A), B * (torch.exp(dt * A) - 1) / A
    else:  # bilinear
        z, B_bar = (1 + dt * A / 2) / (1 - dt * A / 2), B * dt / (1 - dt * A / 2)
    return z, B_bar, torch.view_as_complex(ssm.C.double().contiguous())


def h3_reference(h3, x):
    """H3 with both SSMs run as explicit per-position recurrences (float64)."""
    s, b, d = x.shape
    P = h3.head_dim
    H = d // P
    qkv = F.linear(x, h3.qkv.weight, h3.qkv.bias).double().view(s, b, H, 3, P)
    q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]  # [s, b, H, P]
    # shift SSM: the state x_n(t) = k(t - n) holds the last N inputs (B = e_0 enters at n = 0, A shifts);
    # with a trained B, x(t) = shift(x(t-1)) + B k(t), read out by C: y(t) = sum_n C_n x_n(t)
    C_shift = h3.shift_C.double().view(H, P, -1)
    B_shift = (h3.shift_B.double() if h3.shift_B is not None else F.one_hot(torch.tensor(0), C_shift.shape[-1])
               .double().expand(d, -1)).reshape(H, P, -1)
    state = torch.zeros(b, H, P, C_shift.shape[-1], dtype=torch.float64)
    k_out = []
    for t in range(s):
        state = F.pad(state[..., :-1], (1, 0)) + B_shift * k[t][..., None]
        k_out.append((state * C_shift).sum(-1) + h3.D_k.double().view(H, P) * k[t])
    # diagonal SSM: x(t) = z x(t-1) + B_bar u(t); y = 2 Re(C x) + D u
    z, B_bar, C = h3_discrete(h3.ssm, h3.ssm.discretization)
    state = torch.zeros(b, H, P, P, z.shape[-1], dtype=torch.complex128)
    out = []
    for t in range(s):
        kv = k_out[t][..., :, None] * v[t][..., None, :]  # [b, H, P_i, P_j]
        state = z[:, None, None] * state + B_bar[:, None, None] * kv[..., None]
        y = 2 * (state * C[:, None, None]).sum(-1).real + h3.D.double().view(H, 1, 1) * kv
        out.append((q[t][..., :, None] * y).sum(-2))  # sum over i
    o = torch.stack(out).reshape(s, b, d).float()
    return F.linear(o, h3.out_proj.weight, h3.out_proj.bias)


@pytest.mark.parametrize("discretization", ["bilinear", "zoh"])
@pytest.mark.parametrize("L_long", [1, 2, 1000, 1031])
def test_h3_kernel_matches_closed_form_at_long_lengths(L_long, discretization):
    """The sqrt(L)-split Vandermonde product equals K(l) = 2 Re sum_n C B_bar z^l, formed directly in float64."""
    torch.manual_seed(0)
    ssm = build("h3", seq_length=max(L_long, 8), d_state=16, discretization=discretization).mixer.ssm
    with torch.no_grad():  # a B away from its init value 1
        ssm.B.add_(0.3 * torch.randn_like(ssm.B))
    z, B_bar, C = h3_discrete(ssm, discretization)
    l = torch.arange(L_long, dtype=torch.float64)
    ref = 2 * torch.einsum("hn,hnl->hl", C * B_bar, z[..., None] ** l).real
    K = ssm(L_long)
    assert K.shape == ref.shape and K.dtype == torch.float32
    torch.testing.assert_close(K.double(), ref, atol=2e-5 * ref.abs().max().item(), rtol=1e-4)


def test_short_filter_shift_add_and_fft_paths_equal_conv1d():
    from neox_zoology.mixers.filters import SHIFT_ADD_MAX_TAPS, ShortFilter

    torch.manual_seed(0)
    u = torch.randn(2, 6, 40, requires_grad=True)
    g = torch.randn(2, 6, 40)
    for k in (1, 3, SHIFT_ADD_MAX_TAPS, SHIFT_ADD_MAX_TAPS + 1, 40):
        f = ShortFilter(6, k)
        ref = F.conv1d(u, f.weight, f.bias, padding=k - 1, groups=6)[..., :40]
        ref_grads = torch.autograd.grad((ref * g).sum(), (u, f.weight, f.bias))
        y = f(u)
        grads = torch.autograd.grad((y * g).sum(), (u, f.weight, f.bias))
        tol = 1e-6 if k <= SHIFT_ADD_MAX_TAPS else 1e-5  # the FFT path computes in fp32
        torch.testing.assert_close(y, ref, atol=tol, rtol=tol, msg=f"kernel_size {k}")
        for name, a, b in zip(("u", "weight", "bias"), grads, ref_grads):
            torch.testing.assert_close(a, b, atol=10 * tol, rtol=tol, msg=f"kernel_size {k}: grad {name}")


@pytest.mark.parametrize("kw", [{}, {"head_dim": 2, "d_state": 8}, {"head_dim": 4, "d_state": 16},
                                {"discretization": "zoh"}, {"train_B": False, "head_dim": 2, "d_state": 8}])
def test_h3_matches_per_position_recurrences(kw):
    torch.manual_seed(0)
    m = build("h3", **kw)
    with torch.no_grad():  # trained B, away from their init values (e_0 and 1)
        for p in (m.mixer.shift_B, m.mixer.ssm.B):
            if p is not None:
                p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(L, 2, D)
    assert_rel_close(m(x), h3_reference(m.mixer, x))


# -------------------------------------------------------------------------------------------- rwkv


def wkv_sequential(time_decay, time_first, k, v):
    """The WKV recurrence, one position at a time, in float64 (k, v [B, C, L])."""
    decay = torch.exp(-time_decay.double().exp())
    u, k, v = time_first.double(), k.double(), v.double()
    num = torch.zeros(k.shape[:2], dtype=torch.float64)
    den = torch.zeros_like(num)
    out = []
    for t in range(k.shape[-1]):
        now = torch.exp(u + k[..., t])
        out.append((num + now * v[..., t]) / (den + now))
        num = decay * num + torch.exp(k[..., t]) * v[..., t]
        den = decay * den + torch.exp(k[..., t])
    return torch.stack(out, dim=-1)


WKV_REGIMES = {
    # (time_decay, time_first, key scale, tolerance): RWKV-4's init range, then extreme decays and keys
    # (e^{k} up to e^{120}, far beyond fp32, and per-step decays from 1 - 4e-18 to e^{-2e17})
    "init": (torch.linspace(-5, 3, 8), torch.linspace(-1.5, 0.5, 8), 1.0, 2e-6),
    "extreme": (torch.tensor([-40.0, -20, -5, 0, 3, 6, 12, 40]), torch.linspace(-10, 10, 8), 30.0, 2e-5),
}


@pytest.mark.parametrize("regime", sorted(WKV_REGIMES))
@pytest.mark.parametrize("length,chunk", [(1, 8), (7, 2), (64, 8), (100, 4), (512, 8), (512, 16)])
def test_wkv_matches_sequential_recurrence(regime, length, chunk):
    time_decay, time_first, scale, tol = WKV_REGIMES[regime]
    torch.manual_seed(length)
    k, v = torch.randn(2, 8, length) * scale, torch.randn(2, 8, length)
    y = wkv(time_decay, time_first, k, v, chunk)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), wkv_sequential(time_decay, time_first, k, v), atol=tol, rtol=1e-5)


@pytest.mark.parametrize("regime", sorted(WKV_REGIMES))
@pytest.mark.parametrize("block_elements", [None, 2 * 45])
def test_wkv_gradients_match_sequential_recurrence(regime, block_elements, monkeypatch):
    """Also with channel blocks of one channel (B * L = 90 elements): blocks are checkpointed separately."""
    if block_elements:
        monkeypatch.setattr("neox_zoology.mixers.rwkv.BLOCK_ELEMENTS", block_elements)
    time_decay, time_first, scale, _ = WKV_REGIMES[regime]
    torch.manual_seed(0)
    k, v = torch.randn(2, 8, 45) * scale, torch.randn(2, 8, 45)
    g = torch.randn(2, 8, 45)
    ours = [t.clone().requires_grad_() for t in (time_decay, time_first, k, v)]
    ref = [t.double().requires_grad_() for t in (time_decay, time_first, k, v)]
    (wkv(*ours, chunk=4) * g).sum().backward()
    (wkv_sequential(*ref) * g.double()).sum().backward()
    for name, a, b in zip(("time_decay", "time_first", "k", "v"), ours, ref):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-5 * b.grad.abs().max().item() + 1e-7, rtol=1e-4,
                                   msg=name)


def token_shift_reference(x):
    return torch.stack([torch.zeros_like(x[0])] + [x[t - 1] for t in range(1, x.shape[0])])


def rwkv_reference(tm, x):
    prev = token_shift_reference(x)
    k = F.linear(x * tm.time_mix_k + prev * (1 - tm.time_mix_k), tm.key.weight)
    v = F.linear(x * tm.time_mix_v + prev * (1 - tm.time_mix_v), tm.value.weight)
    r = F.linear(x * tm.time_mix_r + prev * (1 - tm.time_mix_r), tm.receptance.weight)
    mixed = wkv_sequential(tm.time_decay, tm.time_first, k.permute(1, 2, 0), v.permute(1, 2, 0))
    return F.linear(torch.sigmoid(r) * mixed.permute(2, 0, 1).float(), tm.output.weight)


def test_rwkv_time_mix_matches_reference():
    torch.manual_seed(0)
    m = build("rwkv", wkv_chunk=4)
    x = torch.randn(L, 2, D)
    assert_rel_close(m(x), rwkv_reference(m.mixer, x))


def test_rwkv_init_follows_rwkv4():
    n_layers, d = 4, 16
    config = transformer_config(hidden_size=d, num_layers=n_layers)
    for layer in range(1, n_layers + 1):
        tm = registry.get("rwkv").module(config, layer, seq_length=8)
        r0, r1 = (layer - 1) / (n_layers - 1), 1 - (layer - 1) / n_layers
        h = torch.arange(d, dtype=torch.float32)
        torch.testing.assert_close(tm.time_decay, -5 + 8 * (h / (d - 1)) ** (0.7 + 1.3 * r0))
        torch.testing.assert_close(tm.time_first, math.log(0.3) + torch.tensor([0.0, 0.5, -0.5] * 6)[:d])
        torch.testing.assert_close(tm.time_mix_v, (h / d) ** r1 + 0.3 * r0)
        torch.testing.assert_close(tm.time_mix_r, (h / d) ** (0.5 * r1))


def channel_mix_config():
    return transformer_config(hidden_size=D, num_layers=2, ffn_hidden_size=64)


def test_channel_mix_matches_reference():
    torch.manual_seed(0)
    cm = ChannelMix(channel_mix_config(), 2)
    x = torch.randn(L, 2, D)
    prev = token_shift_reference(x)
    k = torch.relu(F.linear(x * cm.time_mix_k + prev * (1 - cm.time_mix_k), cm.key.weight)) ** 2
    r = torch.sigmoid(F.linear(x * cm.time_mix_r + prev * (1 - cm.time_mix_r), cm.receptance))
    assert_rel_close(cm(x), r * F.linear(k, cm.value.weight))


def rwkv_block_args():
    from neox_zoology.config import build_args

    return build_args({"num_layers": 2, "hidden_size": D, "num_attention_heads": 4, "seq_length": 16,
                       "attention_config": [[["rwkv4"], 2]], "vocab_size": 64}, world_size=1)


def _block_run(rank, tp):
    from neox_zoology.model.block import ZooBlock

    if tp > 1:
        init_tp(tp)
    args = rwkv_block_args()
    config = transformer_config(hidden_size=D, num_attention_heads=4, num_layers=2,
                                ffn_hidden_size=args.ffn_hidden_size)
    torch.manual_seed(0)
    x = torch.randn(16, 2, D, requires_grad=True)
    torch.manual_seed(1)
    block = ZooBlock(args, config, 2, "rwkv", 1)
    assert isinstance(block.mlp, ChannelMix) and block.mlp.key.weight.shape[0] * tp == 4 * D
    y, _ = block((x, None))
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    x2 = x.detach().clone()
    x2[9:] = torch.randn_like(x2[9:])
    with torch.no_grad():
        y2, _ = block((x2, None))
    grads = {n: gather_tp_grad(p) for n, p in block.named_parameters()}
    return y.detach(), y2, x.grad, grads


def test_rwkv_block_uses_channel_mix_and_matches_over_tp():
    (y1, y1b, gx1, g1), = run_ranks(_block_run, 1, 1)
    assert torch.isfinite(y1).all()
    torch.testing.assert_close(y1b[:9], y1[:9])  # causal through the whole block
    assert not torch.allclose(y1b[9:], y1[9:])
    for y2, y2b, gx2, g2 in run_ranks(_block_run, 2, 2):
        assert_rel_close(y2, y1)
        assert_rel_close(gx2, gx1)
        for n in g1:
            assert_rel_close(g2[n], g1[n], msg=n)


def _channel_mix_tp_run(rank, tp):
    if tp > 1:
        init_tp(tp)
    torch.manual_seed(0)
    x = torch.randn(L, 2, D, requires_grad=True)
    torch.manual_seed(1)
    cm = ChannelMix(channel_mix_config(), 1)
    y = cm(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), x.grad, {n: gather_tp_grad(p) for n, p in cm.named_parameters()}


def test_channel_mix_tp2_equals_tp1():
    (y1, gx1, g1), = run_ranks(_channel_mix_tp_run, 1, 1)
    for y2, gx2, g2 in run_ranks(_channel_mix_tp_run, 2, 2):
        assert_rel_close(y2, y1)
        assert_rel_close(gx2, gx1)
        assert g2.keys() == g1.keys()
        for n in g1:
            assert_rel_close(g2[n], g1[n], msg=n)


# --------------------------------------------------------------------------------------- long_conv


def long_conv_reference(lc, x, glu):
    K = lc.filter.weight
    k = torch.where(K.abs() > lc.lam, K - lc.lam * torch.sign(K), torch.zeros_like(K))  # soft threshold
    u = x.permute(1, 2, 0)
    z = F.gelu(direct_causal_conv(u, k) + lc.D[None, :, None] * u).permute(2, 0, 1)
    y = F.linear(z, lc.out_proj.weight, lc.out_proj.bias)
    if glu:
        y = y[..., :D] * torch.sigmoid(y[..., D:])
    return y


@pytest.mark.parametrize("glu,init_scale", [(True, 0.002), (True, 0.05), (False, 0.05)])
def test_long_conv_matches_direct_convolution(glu, init_scale):
    torch.manual_seed(0)
    m = build("long_conv", glu=glu, init_scale=init_scale)
    x = torch.randn(L, 2, D)
    assert_rel_close(m(x), long_conv_reference(m.mixer, x, glu))


# ------------------------------------------------------------------------- all: causality, TP, sizes

CASES = [
    ("hyena", {}), ("hyena", {"short_filter_order": 4, "modulate": False, "train_pos_emb": False,
                              "filter_init": "kaiming_uniform"}),
    ("h3", {}), ("h3", {"head_dim": 4, "d_state": 8, "discretization": "zoh", "train_B": False}),
    ("rwkv", {}), ("rwkv", {"wkv_chunk": 5, "projection_init": "init_method"}),
    ("long_conv", {"init_scale": 0.05}),
]


@pytest.mark.parametrize("name,kw", CASES)
@pytest.mark.parametrize("train", [True, False])
def test_causal(name, kw, train):
    torch.manual_seed(0)
    m = neox_zoology.build_mixer(name, hidden_size=D, seq_length=L, **kw)
    m.train(train)
    assert_causal(m, torch.randn(2, L, D), 10, assert_rel_close)


@pytest.mark.parametrize("name,kw", CASES[::2])
def test_bf16_runs_with_fp32_inside(name, kw):
    torch.manual_seed(0)
    m = neox_zoology.build_mixer(name, hidden_size=D, seq_length=L, **kw)
    x = torch.randn(2, L, D)
    y32 = m(x).detach()
    xb = x.bfloat16().requires_grad_()
    y = m.to(torch.bfloat16)(xb)
    y.float().square().sum().backward()
    assert y.dtype == torch.bfloat16 and torch.isfinite(xb.grad.float()).all()
    assert (y.float() - y32).abs().max() < 0.05 * y32.abs().max()  # bf16 weights and activations, fp32 FFT/WKV


def _mixer_tp_run(rank, tp, name, kw):
    if tp > 1:
        init_tp(tp)
    torch.manual_seed(0)
    x = torch.randn(L, 2, D, requires_grad=True)
    torch.manual_seed(1)
    m = build(name, **kw)
    y = m(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = {n: gather_tp_grad(p) for n, p in m.named_parameters()}
    return y.detach(), x.grad.detach(), grads


@pytest.mark.parametrize("name,kw", CASES)
def test_tp2_equals_tp1(name, kw):
    (y1, gx1, g1), = run_ranks(_mixer_tp_run, 1, 1, name, kw)
    for y2, gx2, g2 in run_ranks(_mixer_tp_run, 2, 2, name, kw):
        assert_rel_close(y2, y1)
        assert_rel_close(gx2, gx1)
        assert g2.keys() == g1.keys()
        for n in g1:
            assert_rel_close(g2[n], g1[n], msg=n)


def param_count(name, d, L, args):
    """Parameters per layer (mixer only), as documented for sizing configs."""
    if name == "hyena":
        o, k, e = args["filter_order"], args["short_filter_order"], args["emb_dim"]
        z = L * e if args["train_pos_emb"] else 0  # trained positional features
        return 4 * d * d + d * (3 * k + 8 + o) + 2 * o * o + (e + 4) * o + z
    if name == "h3":
        n, heads = args["d_state"], d // args["head_dim"]
        trained_B = d * n + heads * n if args["train_B"] else 0  # shift B [d, N]; diagonal B, N/2 complex per head
        return 4 * d * d + 5 * d + d * n + heads * (2 * n + 2) + trained_B
    if name == "rwkv":
        return 4 * d * d + 5 * d
    if name == "long_conv":
        return d * L + d + (2 * d * d + 2 * d if args["glu"] else d * d + d)
    raise KeyError(name)


@pytest.mark.parametrize("name,kw", CASES + [("long_conv", {"glu": False})])
def test_parameter_count_formula_on_meta_device(name, kw):
    d, length = 64, 48
    with torch.device("meta"):  # the dry run's path: no memory, no init
        m = neox_zoology.build_mixer(name, hidden_size=d, seq_length=length, **kw)
    assert sum(p.numel() for p in m.parameters()) == param_count(name, d, length, registry.resolve_args(name, kw))


def test_channel_mix_parameters_and_flops():
    cm = ChannelMix(channel_mix_config(), 1)
    assert sum(p.numel() for p in cm.parameters()) == 2 * D * 64 + D * D + 2 * D
    assert ChannelMix.flops(D, 64) == 2 * (2 * D * 64) + 2 * D * D


def test_model_flops_and_validation_through_config():
    from neox_zoology.config import build_args

    args = build_args({"num_layers": 4, "hidden_size": D, "num_attention_heads": 4, "seq_length": 64,
                       "attention_config": [[["hyena", "h3", "rwkv4", "long_conv"], 4]], "vocab_size": 64,
                       "h3": {"head_dim": 2}}, world_size=1)
    shape = args.shape()
    for name in ("hyena", "h3", "rwkv", "long_conv"):
        f = registry.get(name).flops(shape, args.mixer_args(name))
        assert math.isfinite(f) and f > flops.linear(D, D)
    assert flops.model_forward_per_token(args) > 0


# ----------------------------------------------------------------------------------------- validation

BAD_ARGS = [
    ("hyena", {"short_filter_order": L + 1}, "hyena.short_filter_order"),
    ("hyena", {"short_filter_order": 0}, "hyena.short_filter_order"),
    ("hyena", {"emb_dim": 4}, "hyena.emb_dim"),
    ("hyena", {"filter_order": 0}, "hyena.filter_order"),
    ("hyena", {"modulate": "yes"}, "hyena.modulate"),
    ("hyena", {"train_pos_emb": 1}, "hyena.train_pos_emb"),
    ("hyena", {"filter_init": "xavier"}, "hyena.filter_init: 'xavier'; use 'normal' or 'kaiming_uniform'"),
    ("h3", {"discretization": "foh"}, "h3.discretization: 'foh'; use 'bilinear'"),
    ("h3", {"train_B": "yes"}, "h3.train_B"),
    ("rwkv", {"projection_init": "normal"}, "rwkv.projection_init: 'normal'"),
    ("h3", {"d_state": 0}, "h3.d_state: 0; use a positive even int"),
    ("h3", {"d_state": 7}, "h3.d_state: 7"),
    ("h3", {"head_dim": 5}, "h3.head_dim: 5; use a positive int that divides hidden_size 32"),
    ("rwkv", {"wkv_chunk": 1}, "rwkv.wkv_chunk"),
    ("long_conv", {"lam": -0.1}, "long_conv.lam"),
    ("long_conv", {"init_scale": 0}, "long_conv.init_scale"),
    ("long_conv", {"glu": 1}, "long_conv.glu"),
]


@pytest.mark.parametrize("name,kw,message", BAD_ARGS)
def test_validation_errors(name, kw, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        neox_zoology.build_mixer(name, hidden_size=D, seq_length=L, **kw)


@pytest.mark.parametrize("name,kw,tp,message", [
    ("h3", {"head_dim": 8}, 8, "h3: 4 heads (hidden_size 32 / head_dim 8) do not split over model_parallel_size 8"),
])
def test_validation_of_tensor_parallel_split(name, kw, tp, message):
    shape = registry.Shape(hidden_size=D, seq_length=L, num_attention_heads=4, tp=tp)
    problems = registry.get(name).validate(shape, registry.resolve_args(name, kw))
    assert any(message in p for p in problems), problems


def test_config_reports_h3_heads_that_do_not_split():
    from neox_zoology.config import ConfigError, build_args

    raw = {"num_layers": 1, "hidden_size": D, "num_attention_heads": 8, "seq_length": L, "vocab_size": 64,
           "attention_config": [[["h3"], 1]], "h3": {"head_dim": 8}, "model_parallel_size": 8}
    with pytest.raises(ConfigError, match="h3: 4 heads"):
        build_args(raw, world_size=8)


@pytest.mark.parametrize("name,kw,no_decay", [
    ("hyena", {}, {"filter.z", "filter.inner.0.weight", "filter.inner.1.weight", "filter.inner.2.weight",
                   "filter.out_weight"}),
    ("h3", {}, {"shift_C", "shift_B", "ssm.C", "ssm.B", "ssm.log_A_real", "ssm.A_imag"}),
    ("baseconv", {"kernel_sizes": [-1], "long_filter": "explicit"}, {"filter.weight"}),
    ("baseconv", {"kernel_sizes": [-1]}, {"filter.inner.weight", "filter.outer.weight"}),
    ("long_conv", {}, {"filter.weight"}),
])
def test_long_filter_and_ssm_matrices_get_no_weight_decay(name, kw, no_decay):
    from neox_zoology.training.engine import param_groups

    m = build(name, **kw).mixer
    decay, skip = param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and skip["weight_decay"] == 0.0
    names = {id(p): n for n, p in m.named_parameters()}
    decayed, skipped = {names[id(p)] for p in decay["params"]}, {names[id(p)] for p in skip["params"]}
    assert no_decay <= skipped, no_decay - skipped
    matrices = {n for n, p in m.named_parameters() if p.dim() >= 2}
    assert decayed == matrices - no_decay - {n for n in matrices if n.startswith(("filter.", "ssm."))}
    assert any("proj" in n or "qkv" in n for n in decayed)  # projections keep their decay

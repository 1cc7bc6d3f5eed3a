"""Based, GLA, gated DeltaNet, Mamba and Mamba-2: the chunked forward and the one-token step both equal a plain
token-by-token recurrence of the reference's formula, written here from the layer's parameters (fp64)."""
import math

import pytest
import torch
import torch.nn.functional as F

import neox_zoology
from neox_zoology.config import ConfigError, build_args

D, L, HEADS, B = 32, 29, 4, 2
REL = 1e-8


def build(name, **kw):
    torch.manual_seed(0)
    m = neox_zoology.build_mixer(name, hidden_size=D, seq_length=L, num_attention_heads=HEADS, **kw).double()
    with torch.no_grad():  # biases and norm weights away from their init, so the reference sees them
        for n, p in m.named_parameters():
            if n.endswith(("norm.weight", "norm_weight")) or n.endswith("bias") and p.abs().max() == 0:
                p.add_(0.3 * torch.randn_like(p))
    return m


def inputs():
    return torch.randn(B, L, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def conv(x, c):
    """Plain causal depthwise conv of x [B, L, ch] with a ShortConv's taps (nn.Conv1d cross-correlation)."""
    if c is None:
        return x
    k = c.kernel_size
    xp = F.pad(x, (0, 0, k - 1, 0))
    y = sum(xp[:, j:j + x.shape[1]] * c.weight[:, 0, j] for j in range(k))
    y = y + (c.bias if c.bias is not None else 0)
    return F.silu(y) if c.activation else y


def rms_gate(o, w, eps, g):
    y = o / torch.sqrt((o * o).mean(-1, keepdim=True) + eps) * w
    return y if g is None else y * g * torch.sigmoid(g)


def ref_based(m, x):
    Hh, Fd, P = m.local_heads, m.feature_dim, m.head_dim
    q = conv(x @ m.q.weight.T, m.q_conv).view(B, L, Hh, Fd)
    k = conv(x @ m.k.weight.T, m.k_conv).view(B, L, Hh, Fd)
    v = conv(x @ m.v.weight.T, m.v_conv).view(B, L, Hh, P)
    out = torch.zeros(B, L, Hh, P, dtype=x.dtype)
    for t in range(L):
        for s in range(t + 1):
            dot = (q[:, t] * k[:, s]).sum(-1) / math.sqrt(Fd)  # phi(q).phi(k) = 1 + x + x^2 / 2
            out[:, t] += (1 + dot + dot ** 2 / 2)[..., None] * v[:, s]
        den = sum(1 + (q[:, t] * k[:, s]).sum(-1) / math.sqrt(Fd) + ((q[:, t] * k[:, s]).sum(-1) / math.sqrt(Fd)) ** 2 / 2
                  for s in range(t + 1))
        out[:, t] /= den[..., None] + m.eps
    return out.reshape(B, L, -1) @ m.out.weight.T


def ref_gla(m, x):
    Hh = m.local_heads
    q = conv(x @ m.q.weight.T, m.q_conv).view(B, L, Hh, -1)
    k = conv(x @ m.k.weight.T, m.k_conv).view(B, L, Hh, -1)
    v = conv(x @ m.v.weight.T, m.v_conv).view(B, L, Hh, -1)
    gk = F.logsigmoid((x @ m.gate_down.T) @ m.gate_up.weight.T + m.gate_up.bias) / m.normalizer
    gk = gk.view(B, L, Hh, -1)
    S = torch.zeros(B, Hh, q.shape[-1], v.shape[-1], dtype=x.dtype)
    out = []
    for t in range(L):
        S = S * gk[:, t].exp()[..., None] + k[:, t, ..., None] * v[:, t, :, None, :]
        out.append((q[:, t, ..., None] * q.shape[-1] ** -0.5 * S).sum(-2))
    o = torch.stack(out, 1)
    g = (x @ m.g.weight.T).view(B, L, Hh, -1) if m.g is not None else None
    return rms_gate(o, m.norm.weight, m.norm.eps, g).reshape(B, L, -1) @ m.out.weight.T


def ref_gated_deltanet(m, x):
    Hh, K = m.local_heads, m.head_k
    act = (lambda z: z) if m.q_conv is not None else F.silu
    q = act(conv(x @ m.q.weight.T, m.q_conv)).view(B, L, Hh, K)
    k = act(conv(x @ m.k.weight.T, m.k_conv)).view(B, L, Hh, K)
    v = act(conv(x @ m.v.weight.T, m.v_conv)).view(B, L, Hh, -1)
    q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6) / math.sqrt(K)
    k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    beta = torch.sigmoid(x @ m.beta.weight.T)
    alpha = torch.exp(-m.A_log.exp() * F.softplus(x @ m.alpha.weight.T + m.dt_bias))
    S = torch.zeros(B, Hh, K, v.shape[-1], dtype=x.dtype)
    eye = torch.eye(K, dtype=x.dtype)
    out = []
    for t in range(L):
        kt = k[:, t]
        S = alpha[:, t, :, None, None] * (eye - beta[:, t, :, None, None] * kt[..., :, None] * kt[..., None, :]) @ S \
            + beta[:, t, :, None, None] * kt[..., :, None] * v[:, t, :, None, :]
        out.append((q[:, t, ..., None] * S).sum(-2))
    o = torch.stack(out, 1)
    g = (x @ m.g.weight.T).view(B, L, Hh, -1) if m.g is not None else None
    return rms_gate(o, m.norm.weight, m.norm.eps, g).reshape(B, L, -1) @ m.out.weight.T


def ref_mamba(m, x):
    R, N = m.rank, m.d_state
    xs = conv(x @ m.in_x.weight.T, m.conv)
    z = x @ m.in_z.weight.T
    dbl = xs @ m.x_proj.weight.T
    dt = F.softplus(dbl[..., :R] @ m.dt_proj.weight.T + m.dt_proj.bias)
    Bm, Cm = dbl[..., R:R + N], dbl[..., R + N:]
    A = -m.A_log.exp()
    h = torch.zeros(B, xs.shape[-1], N, dtype=x.dtype)
    ys = []
    for t in range(L):
        h = torch.exp(dt[:, t, :, None] * A) * h + dt[:, t, :, None] * Bm[:, t, None, :] * xs[:, t, :, None]
        ys.append((h * Cm[:, t, None, :]).sum(-1) + m.D * xs[:, t])
    return (torch.stack(ys, 1) * F.silu(z)) @ m.out.weight.T


def ref_mamba2(m, x):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T per head (B, C of the head's group), y_t = h_t C_t + D x_t,
    then RMSNorm over each group of channels of y * silu(z)."""
    H, P, N, G = m.local_heads, m.head_dim, m.d_state, m.ngroups

    def lin(layer):
        return x @ layer.weight.T + (layer.bias if layer.bias is not None else 0)

    xs = conv(lin(m.in_x), m.conv_x).view(B, L, H, P)
    Bm, Cm = conv(lin(m.in_B), m.conv_B).view(B, L, G, N), conv(lin(m.in_C), m.conv_C).view(B, L, G, N)
    dt = F.softplus(lin(m.in_dt) + m.dt_bias)
    A = -m.A_log.exp()
    h = torch.zeros(B, H, P, N, dtype=x.dtype)
    ys = torch.zeros(B, L, H, P, dtype=x.dtype)
    for t in range(L):
        for head in range(H):
            g = head // (H // G)
            h[:, head] = torch.exp(dt[:, t, head] * A[head])[:, None, None] * h[:, head] \
                + (dt[:, t, head, None] * xs[:, t, head])[:, :, None] * Bm[:, t, g, None, :]
            ys[:, t, head] = (h[:, head] * Cm[:, t, g, None, :]).sum(-1) + m.D[head] * xs[:, t, head]
    v = (ys.reshape(B, L, H * P) * F.silu(lin(m.in_z))).view(B, L, G, -1)
    v = v / torch.sqrt((v * v).mean(-1, keepdim=True) + m.eps)
    return (v.reshape(B, L, H * P) * m.norm_weight) @ m.out.weight.T + (m.out.bias if m.out.bias is not None else 0)


CASES = [
    ("based", {}, ref_based), ("based", {"conv_size": 3, "chunk_size": 8}, ref_based),
    ("gla", {}, ref_gla), ("gla", {"conv_size": 4, "output_gate": False, "chunk_size": 7}, ref_gla),
    ("gated_deltanet", {}, ref_gated_deltanet),
    ("gated_deltanet", {"conv_size": 0, "chunk_size": 5, "num_heads": 2}, ref_gated_deltanet),
    ("mamba", {}, ref_mamba), ("mamba", {"chunk_size": 5, "dt_rank": 3, "d_state": 4}, ref_mamba),
    ("mamba2", {}, ref_mamba2),
    ("mamba2", {"chunk_size": 5, "head_dim": 8, "ngroups": 2, "d_state": 4, "bias": True, "d_conv": 3}, ref_mamba2),
]
IDS = [f"{n}-{'-'.join(f'{k}{v}' for k, v in kw.items()) or 'defaults'}" for n, kw, _ in CASES]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name,kw,ref", CASES, ids=IDS)
def test_chunked_forward_equals_the_plain_recurrence(name, kw, ref):
    m = build(name, **kw)
    x = inputs()
    with torch.no_grad():
        assert rel_err(m(x), ref(m.mixer, x)) <= REL


@pytest.mark.parametrize("name,kw,ref", CASES, ids=IDS)
def test_one_token_steps_equal_the_plain_recurrence(name, kw, ref):
    m = build(name, **kw)
    x = inputs()
    with torch.no_grad():
        state = m.mixer.initial_state(B, torch.float64)
        ys = []
        for t in range(L):
            y, state = m.mixer.step(x[:, t], state)
            ys.append(y)
        assert rel_err(torch.stack(ys, 1), ref(m.mixer, x)) <= REL


@pytest.mark.parametrize("name", ["based", "gla", "gated_deltanet", "mamba", "mamba2"])
def test_gradients_of_the_chunked_form_match_a_single_chunk(name):
    """Chunk boundaries (and Mamba's per-chunk recompute) leave the gradients unchanged."""
    grads = []
    for chunk in (L, 6):
        m = build(name, chunk_size=chunk)
        x = inputs().requires_grad_(True)
        m(x).pow(2).sum().backward()
        grads.append([x.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        assert rel_err(a, b) <= REL


def test_based_features_reproduce_the_taylor_expansion():
    from neox_zoology.mixers.linear_attention.based import taylor_features

    q, k = torch.randn(5, 16, dtype=torch.float64), torch.randn(5, 16, dtype=torch.float64)
    dot = (q * k).sum(-1) / 4.0
    assert taylor_features(q).shape[-1] == 1 + 16 + 256
    torch.testing.assert_close((taylor_features(q) * taylor_features(k)).sum(-1), 1 + dot + dot ** 2 / 2)


def test_gla_starts_with_the_reference_gate_scale():
    torch.manual_seed(0)
    m = neox_zoology.build_mixer("gla", hidden_size=D, seq_length=L, num_attention_heads=HEADS).mixer
    g = m._log_decay(inputs().float())
    assert (g <= 0).all() and g.mean().item() == pytest.approx(math.log(0.5) / 16, rel=0.05)  # logsigmoid(~0) / 16


def test_mamba_initialisation_follows_the_reference():
    torch.manual_seed(0)
    m = neox_zoology.build_mixer("mamba", hidden_size=D, seq_length=L, num_attention_heads=HEADS).mixer
    torch.testing.assert_close(m.A_log[3], torch.log(torch.arange(1, 17, dtype=torch.float32)))
    assert torch.equal(m.D, torch.ones(2 * D))
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-4 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert m.rank == math.ceil(D / 16) and m.dt_proj.weight.abs().max() <= m.rank ** -0.5


@pytest.mark.parametrize("name", ["mamba", "mamba2"])
@pytest.mark.parametrize("num_layers", [1, 4])
def test_mamba_projections_start_as_the_references_linear_layers(name, num_layers):
    """state-spaces/mamba's _init_weights (and zoology's for Mamba blocks) keep nn.Linear's U(+-fan_in^-1/2) on
    in_proj and x_proj and divide out_proj's by sqrt(n_layer); `init_method` is GPT-NeoX's (N(0, 0.02))."""
    torch.manual_seed(0)
    d = 256
    m = neox_zoology.build_mixer(name, hidden_size=d, seq_length=L, num_attention_heads=HEADS,
                                 num_layers=num_layers).mixer
    inner = [m.in_x, m.in_z, m.x_proj] if name == "mamba" else [m.in_x, m.in_z, m.in_B, m.in_C]
    for w, fan_in, scale in [(lin.weight, lin.weight.shape[1], 1.0) for lin in inner] + \
            [(m.out.weight, 2 * d, num_layers ** -0.5)]:
        bound = scale / math.sqrt(fan_in)
        assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)  # uniform's std
    torch.manual_seed(0)
    neox = neox_zoology.build_mixer(name, hidden_size=d, seq_length=L, num_attention_heads=HEADS,
                                    num_layers=num_layers, projection_init="init_method").mixer
    assert neox.in_x.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert neox.out.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * num_layers), rel=0.02)
    with pytest.raises(ValueError, match=rf"{name}.projection_init: 'xavier'; use 'kaiming_uniform'"):
        neox_zoology.build_mixer(name, hidden_size=d, seq_length=L, projection_init="xavier")


def test_mamba2_initialisation_follows_the_reference():
    torch.manual_seed(0)
    m = neox_zoology.build_mixer("mamba2", hidden_size=256, seq_length=L, num_attention_heads=HEADS, head_dim=8).mixer
    A = m.A_log.exp()
    assert m.A_log.shape == (64,) and A.min() >= 1 and A.max() <= 16 and A.std() > 3  # U[1, 16] per head
    assert torch.equal(m.D, torch.ones(64)) and torch.equal(m.norm_weight, torch.ones(512))
    dt = F.softplus(m.dt_bias)
    assert dt.min() >= 1e-4 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert dt.log().std() > 0.9  # log-uniform over [ln 1e-3, ln 1e-1]: std 4.6 / sqrt(12) = 1.33
    n_in = 256 * (2 * 512 + 64 + 2 * 128)  # in_proj [z, x, dt, B, C] of the reference, no bias
    conv = (512 + 2 * 128) * 5  # taps and bias
    assert sum(p.numel() for p in m.parameters()) == n_in + conv + 3 * 64 + 512 + 512 * 256


@pytest.mark.parametrize("chunk", [1, 4, 7, 23, 64])
def test_selective_scan_backward_equals_autograd_through_the_recurrence(chunk):
    """The scan's hand-written backward against autograd through one-position steps: y, the final state and
    the gradients of x, dt, A, B, C, D and the initial state, with upstream gradients on y and on h_L (fp64)."""
    from neox_zoology.mixers.mamba.scan import selective_scan, selective_scan_step

    g = torch.Generator().manual_seed(3)
    b, E, N, n = 2, 5, 3, 23
    x, B_, C_ = (torch.randn(b, *s, generator=g, dtype=torch.float64) for s in ((E, n), (N, n), (N, n)))
    dt = torch.rand(b, E, n, generator=g, dtype=torch.float64) * 0.5 + 0.01
    A, D_ = -torch.rand(E, N, generator=g, dtype=torch.float64) * 3, torch.randn(E, generator=g, dtype=torch.float64)
    h0 = torch.randn(b, E, N, generator=g, dtype=torch.float64)
    leaves = [t.requires_grad_(True) for t in (x, dt, A, B_, C_, D_, h0)]
    y, hL = selective_scan(x, dt, A, B_, C_, D_, chunk, h0)
    h, ys = h0, []
    for t in range(n):
        yt, h = selective_scan_step(h, x[..., t], dt[..., t], A, B_[..., t], C_[..., t], D_)
        ys.append(yt)
    y_ref = torch.stack(ys, -1)
    assert rel_err(y, y_ref) <= REL and rel_err(hL, h) <= REL
    gy, gh = torch.randn(y.shape, generator=g, dtype=torch.float64), torch.randn(h.shape, generator=g,
                                                                                  dtype=torch.float64)
    ours = torch.autograd.grad((y * gy).sum() + (hL * gh).sum(), leaves)
    ref = torch.autograd.grad((y_ref * gy).sum() + (h * gh).sum(), leaves)
    for a, r in zip(ours, ref):
        assert rel_err(a, r) <= REL


def test_selective_scan_passes_gradcheck():
    from neox_zoology.mixers.mamba.scan import selective_scan

    g = torch.Generator().manual_seed(4)
    b, E, N, n = 1, 3, 2, 9
    args = [torch.randn(b, E, n, generator=g, dtype=torch.float64), torch.rand(b, E, n, generator=g,
                                                                              dtype=torch.float64) + 0.05,
            -torch.rand(E, N, generator=g, dtype=torch.float64), torch.randn(b, N, n, generator=g, dtype=torch.float64),
            torch.randn(b, N, n, generator=g, dtype=torch.float64), torch.randn(E, generator=g, dtype=torch.float64),
            torch.randn(b, E, N, generator=g, dtype=torch.float64)]
    args = [a.requires_grad_(True) for a in args]
    assert torch.autograd.gradcheck(lambda x, dt, A, B_, C_, D_, h0: selective_scan(x, dt, A, B_, C_, D_, 4, h0), args)


def test_mamba2_chunked_form_carries_a_given_state():
    from neox_zoology.mixers.mamba.mamba2 import chunked_ssd, ssd_step

    g = torch.Generator().manual_seed(2)
    b, H, G, P, N, n = 2, 4, 2, 3, 5, 11
    x, B_, C_ = (torch.randn(b, *s, generator=g, dtype=torch.float64) for s in ((H, n, P), (G, n, N), (G, n, N)))
    dt = torch.rand(b, H, n, generator=g, dtype=torch.float64)
    A, h0 = -torch.rand(H, generator=g, dtype=torch.float64) * 4, torch.randn(b, H, P, N, generator=g,
                                                                             dtype=torch.float64)
    y, hL = chunked_ssd(x, dt, A, B_, C_, chunk_size=4, initial_state=h0)
    h = h0
    for t in range(n):
        yt, h = ssd_step(h, x[:, :, t], dt[:, :, t], A, B_[:, :, t], C_[:, :, t])
        assert rel_err(y[:, :, t], yt) <= REL
    assert rel_err(hL, h) <= REL


def _mamba2_tp(rank, tp, kw):
    from dist import gather_tp_grad, init_tp

    if tp > 1:
        init_tp(tp)
    torch.manual_seed(0)
    x = torch.randn(L, 2, D, requires_grad=True)
    torch.manual_seed(1)
    m = neox_zoology.build_mixer("mamba2", hidden_size=D, seq_length=L, num_attention_heads=HEADS, batch_first=False,
                                 **kw)
    y = m(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), x.grad, {n: gather_tp_grad(p) for n, p in m.named_parameters()}


@pytest.mark.parametrize("kw", [{"ngroups": 2}, {"ngroups": 1}], ids=["groups-split", "groups-replicated"])
def test_mamba2_tp2_equals_tp1(kw):
    from dist import run_ranks

    kw = {**kw, "head_dim": 8, "d_state": 4, "chunk_size": 7}
    (y1, gx1, g1), = run_ranks(_mamba2_tp, 1, 1, kw)
    for y2, gx2, g2 in run_ranks(_mamba2_tp, 2, 2, kw):
        torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gx2, gx1, rtol=1e-5, atol=1e-6)
        for n in g1:
            torch.testing.assert_close(g2[n], g1[n], rtol=1e-5, atol=1e-6, msg=n)


def test_gated_deltanet_has_the_reference_layer_size():
    """zoology's layer takes head_dim = d / num_heads, so key dim d and value dim 2d: q, k d^2 each, v, g, o
    2 d^2 each (8 d^2), plus convs, gates and the norm."""
    m = neox_zoology.build_mixer("gated_deltanet", hidden_size=64, seq_length=8, num_attention_heads=4)
    n = sum(p.numel() for p in m.parameters())
    small = 4 * (64 + 64 + 128) + 2 * 64 * 4 + 2 * 4 + 32
    assert n == 8 * 64 * 64 + small


def _config(name, **section):
    return {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 24, "vocab_size": 64,
            "attention_config": [[[name], "all"]], name: section}


@pytest.mark.parametrize("name,section,key", [
    ("based", {"num_heads": 3}, "num_heads"),
    ("gla", {"expand_k": 0.3}, "num_heads"),
    ("gated_deltanet", {"expand_v": 1.3}, "expand_v"),
    ("mamba", {"dt_min": 0.5, "dt_max": 0.1}, "dt_min"),
    ("mamba", {"dt_init": "uniform"}, "dt_init"),
    ("mamba2", {"head_dim": 48}, "head_dim"),
    ("mamba2", {"head_dim": 8, "ngroups": 3}, "ngroups"),
    ("mamba2", {"A_init_range": [16, 1]}, "A_init_range"),
])
def test_an_out_of_range_value_fails_in_one_line_naming_the_key(name, section, key):
    with pytest.raises(ConfigError) as err:
        build_args(_config(name, **section), world_size=1)
    msg = str(err.value)
    assert f"{name}.{key}" in msg and "\n" not in msg


def test_heads_that_do_not_split_over_tp_are_refused():
    raw = {**_config("gla", num_heads=3, expand_k=0.75, expand_v=0.75), "model_parallel_size": 2}
    with pytest.raises(ConfigError, match="gla.num_heads: 3 heads do not split over model_parallel_size 2"):
        build_args(raw, world_size=2)


def test_mamba2_groups_that_neither_split_nor_replicate_over_tp_are_refused():
    raw = {**_config("mamba2", expand=3, head_dim=16, ngroups=3), "model_parallel_size": 2}
    with pytest.raises(ConfigError, match="mamba2.ngroups: 3 groups neither split over model_parallel_size 2"):
        build_args(raw, world_size=2)

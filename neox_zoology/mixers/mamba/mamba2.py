"""Mamba-2 (SSD): a state-space layer with a scalar decay per head, chunked in plain PyTorch.

With E = expand d inner channels in H = E / P heads of P = head_dim channels, N = d_state, G = ngroups:

    z, x, B, C, dt_in = W_z u, W_x u, W_B u, W_C u, W_dt u        (the reference's in_proj, [E, E, GN, GN, H])
    x, B, C = silu(conv(x)), silu(conv(B)), silu(conv(C))         depthwise causal conv of d_conv taps, bias
    dt = softplus(dt_in + b_dt) [H],  A = -exp(A_log) [H]          head h reads group g = h // (H / G) of B, C
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T  [P, N],   y_t = h_t C_t + D x_t
    out = W_o RMSNorm_G(y * silu(z))         RMSNorm over each group of E / G channels (norm_before_gate false)

As state-spaces/mamba `Mamba2` (and zoology's copy) with rmsnorm on, D per head, no dt limit: A_log = log
U[A_init_range], D = 1, b_dt = softplus^-1 of dt log-uniform in [dt_min, dt_max] floored at dt_init_floor;
A_log, D, b_dt without weight decay; `projection_init` as Mamba's (layer.py: `kaiming_uniform`, the reference's
nn.Linear default with W_o divided by sqrt(num_layers), or `init_method`, the model's). `chunked_ssd` is the
SSD chunked form (derivation: docs/recall-mixers.md): O(L) memory, C x B computed once per group. The block is
norm + Mamba-2 only (`mlp: true` adds the MLP). Tensor parallelism: heads split (W_z, W_x, W_dt column-parallel,
W_o row-parallel); the groups split when TP divides G, else (G dividing TP) W_B, W_C and their convs are
replicated and a norm group's sum of squares is summed over the ranks that share it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neox_zoology import flops
from neox_zoology.mixers.base import (Mixer, check_projection_init, exclude_from_weight_decay, full_then_local,
                                      projection_inits)
from neox_zoology.mixers.linear_attention import fla_path
from neox_zoology.mixers.linear_attention.common import ShortConv, check_bool, check_int, check_number
from neox_zoology.mixers.linear_attention.gated_deltanet import inverse_softplus_dt
from neox_zoology.mixers.linear_attention.kernels import compute_dtype
from neox_zoology.parallel import (ColumnLinear, RowLinear, copy_to_tp, mark_tp_param, reduce_from_tp, tp_rank,
                                   tp_size, tp_slice)
from neox_zoology.registry import STATE_BYTES, MixerSpec, is_number, register


def chunked_ssd(x, dt, A, B, C, chunk_size: int = 64, initial_state=None):
    """The SSD recurrence of the module docstring without the D skip, in chunks of `chunk_size` positions.

    x [b, H, L, P], dt [b, H, L] (> 0), A [H] (< 0), B, C [b, G, L, N]; head h reads group h // (H / G).
    Returns (y [b, H, L, P], h_L [b, H, P, N]). Inside a chunk a masked Q x Q product, across chunks the
    state carried forward; every decay is exp of a non-positive number. CUDA inputs take fla's kernels when
    fla-core is installed (`fla_path.ssd`).
    """
    if fla_path.usable(C, x, initial_state):
        return fla_path.ssd(x, dt, A, B, C, initial_state)
    b, H, L, P = x.shape
    G, N = B.shape[1], B.shape[-1]
    hg, Q = H // G, max(1, min(chunk_size, L))
    n = -(-L // Q)

    def split(t):  # [b, g, L, ...] -> [b, g, n, Q, ...]; padded positions have dt 0: no write, no decay
        pad = n * Q - L
        t = F.pad(t, (0, 0) * (t.dim() - 3) + (0, pad)) if pad else t
        return t.reshape(*t.shape[:2], n, Q, *t.shape[3:])

    xs = split(x * dt[..., None]).view(b, G, hg, n, Q, P)  # dt_s x_s
    cum = split(dt * A[:, None]).cumsum(-1)  # [b, H, n, Q]: log decay from the chunk start, inclusive
    Bc, Cc = split(B), split(C)  # [b, G, n, Q, N]
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    scores = (Cc @ Bc.transpose(-1, -2))[:, :, None] * decay.view(b, G, hg, n, Q, Q)
    intra = scores @ xs  # [b, G, hg, n, Q, P]
    last = cum[..., -1:]
    cum, last = cum.view(b, G, hg, n, Q), last.view(b, G, hg, n, 1)
    writes = (xs * (last - cum).exp()[..., None]).transpose(-1, -2) @ Bc[:, :, None]  # [b, G, hg, n, P, N]
    S = x.new_zeros(b, G, hg, P, N) if initial_state is None else initial_state.view(b, G, hg, P, N)
    carried = []  # unbind once: indexing chunk c in the loop would cost a full-size zero fill per chunk in backward
    for C_c, cum_c, last_c, w_c in zip(Cc[:, :, None].unbind(3), cum.unbind(3), last.unbind(3), writes.unbind(3)):
        carried.append((C_c @ S.transpose(-1, -2)) * cum_c[..., None].exp())
        S = last_c[..., None].exp() * S + w_c
    y = intra + torch.stack(carried, 3)
    return y.reshape(b, H, n * Q, P)[:, :, :L], S.reshape(b, H, P, N)


def ssd_step(h, x, dt, A, B, C):
    """One position of `chunked_ssd`: h [b, H, P, N], x [b, H, P], dt [b, H], B, C [b, G, N] -> (y, h)."""
    hg = x.shape[1] // B.shape[1]
    B, C = B.repeat_interleave(hg, 1), C.repeat_interleave(hg, 1)
    h = torch.exp(dt * A)[..., None, None] * h + (dt[..., None] * x)[..., None] * B[:, :, None]
    return (h * C[:, :, None]).sum(-1), h


class ReplicatedLinear(nn.Module):
    """W u + b with the same full weight on every TP rank (init as megatron-core's CPU init: full draw, zero bias)."""

    def __init__(self, d_in: int, d_out: int, config, bias: bool, init_method=None):
        super().__init__()
        w = torch.empty(d_out, d_in)
        (init_method or config.init_method)(w)
        self.weight = nn.Parameter(w.to(config.params_dtype))
        self.bias = nn.Parameter(torch.zeros(d_out, dtype=config.params_dtype)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias), None


class Mamba2(Mixer):
    def __init__(self, config, layer_number: int = 1, *, seq_length: int, d_state: int = 128, d_conv: int = 4,
                 expand: int = 2, head_dim: int = 64, ngroups: int = 1, A_init_range=(1.0, 16.0), dt_min: float = 1e-3,
                 dt_max: float = 1e-1, dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False,
                 norm_eps: float = 1e-5, chunk_size: int = 64, mlp: bool = False,
                 projection_init: str = "kaiming_uniform", **stack_kwargs):
        super().__init__(config, layer_number, **stack_kwargs)
        d, dtype, tp = config.hidden_size, config.params_dtype, tp_size()
        E, GN = expand * d, ngroups * d_state
        H = E // head_dim
        split = ngroups % tp == 0
        self.d_state, self.head_dim, self.chunk_size, self.eps = d_state, head_dim, chunk_size, norm_eps
        self.local_heads, self.ngroups, self.group_size = H // tp, ngroups, E // ngroups
        self.local_groups = ngroups // tp if split else 1
        self.group = None if split else tp_rank() // (tp // ngroups)  # the one group this rank's heads read
        inner, outer = projection_inits(config, projection_init)
        lin = dict(config=config, init_method=inner, bias=bias, gather_output=False)
        self.in_z, self.in_x, self.in_dt = ColumnLinear(d, E, **lin), ColumnLinear(d, E, **lin), ColumnLinear(d, H, **lin)
        group_linear = (lambda: ColumnLinear(d, GN, **lin)) if split else \
            (lambda: ReplicatedLinear(d, GN, config, bias, inner))
        self.in_B, self.in_C = group_linear(), group_linear()
        self.conv_x = ShortConv(E, d_conv, bias=conv_bias, activation=True, params_dtype=dtype)
        self.conv_B, self.conv_C = (ShortConv(GN, d_conv, bias=conv_bias, activation=True, params_dtype=dtype,
                                              split=split) for _ in range(2))
        heads = tp_slice(H)
        dt_bias = full_then_local(inverse_softplus_dt(H, dt_min, dt_max, dt_init_floor), 0, heads)
        A = torch.empty(H, dtype=torch.float32).uniform_(*A_init_range)
        self.dt_bias = mark_tp_param(nn.Parameter(dt_bias.to(dtype)))
        self.A_log = mark_tp_param(nn.Parameter(full_then_local(torch.log(A), 0, heads).to(dtype)))
        self.D = mark_tp_param(nn.Parameter(torch.ones(self.local_heads, dtype=dtype)))
        for p in (self.A_log, self.D, self.dt_bias):
            exclude_from_weight_decay(p)
        self.norm_weight = mark_tp_param(nn.Parameter(torch.ones(E // tp, dtype=dtype)))
        self.out = RowLinear(E, d, config=config, init_method=outer, bias=bias,
                             input_is_parallel=True, skip_bias_add=False)

    def _groups(self, bc, dtype):
        """Conv output [b, G_local N, ...] -> [b, G_local, N, ...] (replicated: the group of this rank's heads)."""
        if self.group is not None:  # every rank computed all groups: their gradients are summed over the ranks
            N = self.d_state
            bc = copy_to_tp(bc)[:, self.group * N:(self.group + 1) * N]
        return bc.to(dtype).view(bc.shape[0], self.local_groups, self.d_state, *bc.shape[2:])

    def _gated_norm(self, y, z):
        """RMSNorm over each group of E / G channels of y * silu(z); y, z [..., E_local]."""
        v = y * F.silu(z)
        grouped = v.view(*v.shape[:-1], self.local_groups, -1)
        ss = grouped.pow(2).sum(-1)  # [..., G_local]
        if self.group is not None:  # the group spans several ranks: sum its squares over them
            full = F.pad(ss, (self.group, self.ngroups - 1 - self.group))
            ss = copy_to_tp(reduce_from_tp(full))[..., self.group:self.group + 1]
        rstd = torch.rsqrt(ss / self.group_size + self.eps)
        return (grouped * rstd[..., None]).view_as(v) * self.norm_weight.to(v.dtype)

    def _dt(self, u, dtype):
        return F.softplus(self.in_dt(u)[0].to(dtype) + self.dt_bias.to(dtype))

    def forward(self, hidden_states, attention_mask=None, token_ids=None, **ignored):
        u, dtype = hidden_states, compute_dtype(hidden_states)
        s, b, _ = u.shape
        H, P = self.local_heads, self.head_dim
        x = self.conv_x(self.in_x(u)[0].permute(1, 2, 0)).to(dtype).view(b, H, P, s).transpose(-1, -2)
        Bm = self._groups(self.conv_B(self.in_B(u)[0].permute(1, 2, 0)), dtype).transpose(-1, -2)
        Cm = self._groups(self.conv_C(self.in_C(u)[0].permute(1, 2, 0)), dtype).transpose(-1, -2)
        dt = self._dt(u, dtype).permute(1, 2, 0)  # [b, H, s]
        y, _ = chunked_ssd(x, dt, -self.A_log.to(dtype).exp(), Bm, Cm, self.chunk_size)
        y = (y + self.D.to(dtype)[:, None, None] * x).permute(2, 0, 1, 3).reshape(s, b, H * P)
        y = self._gated_norm(y, self.in_z(u)[0].to(dtype))
        return self.out(y.to(u.dtype))[0], None

    def initial_state(self, batch: int, dtype=torch.float32, device=None) -> dict:
        """Zero state: the conv buffers of x, B, C and h [b, H_local, P, N]."""
        convs = [c.initial_state(batch, dtype, device) for c in (self.conv_x, self.conv_B, self.conv_C)]
        return {"conv": convs,
                "h": torch.zeros(batch, self.local_heads, self.head_dim, self.d_state, dtype=dtype, device=device)}

    def step(self, u: torch.Tensor, state: dict):
        """One position: u [b, d] -> (y [b, d], new state); equal to forward over a sequence, token by token."""
        dtype, b = compute_dtype(u), u.shape[0]
        x, cx = self.conv_x.step(self.in_x(u)[0], state["conv"][0])
        Bv, cb = self.conv_B.step(self.in_B(u)[0], state["conv"][1])
        Cv, cc = self.conv_C.step(self.in_C(u)[0], state["conv"][2])
        x = x.to(dtype).view(b, self.local_heads, self.head_dim)
        y, h = ssd_step(state["h"], x, self._dt(u, dtype), -self.A_log.to(dtype).exp(), self._groups(Bv, dtype),
                        self._groups(Cv, dtype))
        y = self._gated_norm((y + self.D.to(dtype)[:, None] * x).reshape(b, -1), self.in_z(u)[0].to(dtype))
        return self.out(y.to(u.dtype))[0], {"conv": [cx, cb, cc], "h": h}


def _validate(shape, args):
    errors = []
    ok = check_int(errors, "mamba2", args, "expand", 1, "use a positive int (inner channels / hidden_size), e.g. 2")
    ok &= check_int(errors, "mamba2", args, "head_dim", 1, "use a positive int (the reference's: 64)")
    ok &= check_int(errors, "mamba2", args, "ngroups", 1, "use a positive int (the reference's: 1)")
    if ok:
        E, P, G, tp = args["expand"] * shape.hidden_size, args["head_dim"], args["ngroups"], shape.tp
        H = E // P
        if E % P:
            errors.append(f"mamba2.head_dim: {P} does not divide the inner width expand x hidden_size = {E}; "
                          f"use a divisor of {E}")
        elif H % G:
            errors.append(f"mamba2.ngroups: {G} does not divide the {H} heads (expand x hidden_size / head_dim); "
                          f"use a divisor of {H}")
        elif H % tp:
            errors.append(f"mamba2.head_dim: {H} heads (expand x hidden_size / head_dim) do not split over "
                          f"model_parallel_size {tp}; choose head_dim for a multiple of {tp} heads")
        elif G % tp and tp % G:
            errors.append(f"mamba2.ngroups: {G} groups neither split over model_parallel_size {tp} (a multiple of "
                          f"it) nor are replicated on it (a divisor of it); use a multiple or a divisor of {tp}")
    check_int(errors, "mamba2", args, "d_state", 1, "use a positive int (the reference's: 128)")
    check_int(errors, "mamba2", args, "d_conv", 1, "use a positive kernel size (the reference's: 4)")
    r = args["A_init_range"]
    if not (isinstance(r, (list, tuple)) and len(r) == 2 and all(is_number(v) and 0 < v < float("inf") for v in r)
            and r[0] <= r[1]):
        errors.append(f"mamba2.A_init_range: {r!r}; use [low, high] with 0 < low <= high (the reference's: [1, 16])")
    ok = check_number(errors, "mamba2", args, "dt_min", "use a positive number, e.g. 0.001")
    ok &= check_number(errors, "mamba2", args, "dt_max", "use a positive number, e.g. 0.1")
    if ok and args["dt_min"] > args["dt_max"]:
        errors.append(f"mamba2.dt_min: {args['dt_min']!r} is above dt_max {args['dt_max']!r}; use dt_min <= dt_max")
    check_number(errors, "mamba2", args, "dt_init_floor", "use a positive number, e.g. 1e-4")
    check_number(errors, "mamba2", args, "norm_eps", "use a small positive number, e.g. 1e-5")
    for key in ("conv_bias", "bias", "mlp"):
        check_bool(errors, "mamba2", args, key)
    check_int(errors, "mamba2", args, "chunk_size", 1, "use a positive int, e.g. 64")
    check_projection_init(errors, "mamba2", args)
    return errors


def _flops(shape, args):
    d, N, G, P = shape.hidden_size, args["d_state"], args["ngroups"], args["head_dim"]
    E, Q = args["expand"] * d, min(args["chunk_size"], shape.seq_length)
    f = 2 * flops.linear(d, E) + flops.linear(d, E // P) + 2 * flops.linear(d, G * N) + flops.linear(E, d)
    f += flops.short_conv(E + 2 * G * N, args["d_conv"])
    # per token: C.B scores within the chunk (once per group), scores x values (every channel), state write and read
    return f + 2.0 * Q * N * G + 2.0 * Q * E + 4.0 * E * N


def _state_bytes(shape, args, seq_len):
    """h [H, P, N] (E x N numbers) and the convs' last d_conv - 1 inputs of x, B and C."""
    E, GN = args["expand"] * shape.hidden_size, args["ngroups"] * args["d_state"]
    return (E * args["d_state"] + (E + 2 * GN) * (args["d_conv"] - 1)) * STATE_BYTES


register(
    MixerSpec(
        name="mamba2",
        module=Mamba2,
        defaults={"d_state": 128, "d_conv": 4, "expand": 2, "head_dim": 64, "ngroups": 1, "A_init_range": [1.0, 16.0],
                  "dt_min": 1e-3, "dt_max": 1e-1, "dt_init_floor": 1e-4, "conv_bias": True, "bias": False,
                  "norm_eps": 1e-5, "chunk_size": 64, "mlp": False, "projection_init": "kaiming_uniform"},
        tp_split="heads",
        flops=_flops,
        validate=_validate,
        state_bytes=_state_bytes,
        has_mlp=lambda args: bool(args["mlp"]),
        doc="Mamba-2 (SSD): scalar A and input-dependent dt per head, B and C shared per group (`ngroups`), short "
            "conv + SiLU on x, B, C; D skip; RMSNorm over each group of `y ⊙ silu(z)`; chunked SSD O(L); `mlp` and "
            "`projection_init` as for `mamba`",
        tp_note="groups split when TP divides `ngroups`, replicated when `ngroups` divides TP; anything else refused",
    )
)

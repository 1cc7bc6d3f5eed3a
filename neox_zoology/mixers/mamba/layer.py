"""Mamba (S6): a selective state-space layer with input-dependent dt, B and C.

With E = expand d inner channels, N = d_state, R = dt_rank (0: ceil(d / 16)):

    x, z = W_x u, W_z u                          (the reference's in_proj, halves x | z)
    x = silu(conv(x))                            depthwise causal conv of d_conv taps, with bias
    dt_in, B, C = W_xp x                         (R, N, N)
    dt = softplus(W_dt dt_in + b_dt)             [E]
    y = selective_scan(x, dt, A = -exp(A_log), B, C, D)        (scan.py)
    out = W_o (y * silu(z))

Initialisation as the reference (state-spaces/mamba `Mamba` with `_init_weights`, zoology `Mamba` in a
`MambaBlock`): A_log = log(1..N) per channel (S4D-real), D = 1, W_dt uniform +-dt_scale R^-1/2
("random") or constant, b_dt = softplus^-1 of dt log-uniform in [dt_min, dt_max] floored at
dt_init_floor. `projection_init: kaiming_uniform` (the reference's): W_x, W_z, W_xp keep nn.Linear's
U(+-fan_in^-1/2), W_o the same divided by sqrt(num_layers), biases zero; `init_method`: the model's
init_method and output_layer_init_method (GPT-NeoX's Mamba). A_log, D and b_dt get no weight decay.
`bias`: W_x, W_z, W_o biases; `x_proj_bias`: W_xp's. Block: norm + Mamba (`mlp: true` adds the MLP).
TP: inner channels split; W_x, W_z, W_dt column-parallel; W_xp row-parallel (dt_in, B, C summed over ranks,
then shared); W_o row-parallel. Derivations: docs/recall-mixers.md.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from neox_zoology import flops
from neox_zoology.mixers.base import (Mixer, check_projection_init, exclude_from_weight_decay, full_then_local,
                                      projection_inits)
from neox_zoology.mixers.linear_attention.common import ShortConv, check_bool, check_int, check_number
from neox_zoology.mixers.linear_attention.gated_deltanet import inverse_softplus_dt
from neox_zoology.mixers.linear_attention.kernels import compute_dtype
from neox_zoology.mixers.mamba.scan import selective_scan, selective_scan_step
from neox_zoology.parallel import ColumnLinear, RowLinear, copy_to_tp, mark_tp_param, tp_slice
from neox_zoology.registry import STATE_BYTES, MixerSpec, register

DT_INITS = ("random", "constant")


class Mamba(Mixer):
    def __init__(self, config, layer_number: int = 1, *, seq_length: int, d_state: int = 16, d_conv: int = 4,
                 expand: int = 2, dt_rank: int = 0, dt_min: float = 1e-3, dt_max: float = 1e-1,
                 dt_init: str = "random", dt_scale: float = 1.0, dt_init_floor: float = 1e-4, conv_bias: bool = True,
                 bias: bool = False, x_proj_bias: bool = False, chunk_size: int = 32, mlp: bool = False,
                 projection_init: str = "kaiming_uniform", **stack_kwargs):
        super().__init__(config, layer_number, **stack_kwargs)
        d, dtype = config.hidden_size, config.params_dtype
        E, R = expand * d, dt_rank or math.ceil(d / 16)
        self.rank, self.d_state, self.chunk_size = R, d_state, chunk_size
        inner, outer = projection_inits(config, projection_init)
        lin = dict(config=config, init_method=inner, bias=bias, gather_output=False)
        self.in_x, self.in_z = ColumnLinear(d, E, **lin), ColumnLinear(d, E, **lin)
        self.conv = ShortConv(E, d_conv, bias=conv_bias, activation=True, params_dtype=dtype)
        self.x_proj = RowLinear(E, R + 2 * d_state, config=config, init_method=inner, bias=x_proj_bias,
                                input_is_parallel=True, skip_bias_add=False)
        std = dt_scale / math.sqrt(R)
        dt_weight_init = (lambda w: nn.init.uniform_(w, -std, std)) if dt_init == "random" else \
            (lambda w: nn.init.constant_(w, std))
        self.dt_proj = ColumnLinear(R, E, config=config, init_method=dt_weight_init, bias=True, gather_output=False)
        local = tp_slice(E)
        with torch.no_grad():
            self.dt_proj.bias.copy_(full_then_local(inverse_softplus_dt(E, dt_min, dt_max, dt_init_floor), 0, local))
        A_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).expand(E, d_state)
        self.A_log = mark_tp_param(nn.Parameter(full_then_local(A_log, 0, local).to(dtype)))
        self.D = mark_tp_param(nn.Parameter(torch.ones(local.stop - local.start, dtype=dtype)))
        for p in (self.A_log, self.D, self.dt_proj.bias):
            exclude_from_weight_decay(p)
        self.out = RowLinear(E, d, config=config, init_method=outer, bias=bias,
                             input_is_parallel=True, skip_bias_add=False)

    def _dt_B_C(self, x_seq, dtype):
        """x [..., E_local] -> dt [..., E_local], B, C [..., N] (summed over TP ranks, then shared)."""
        R, N = self.rank, self.d_state
        dbl = self.x_proj(x_seq)[0]
        dt = F.softplus(self.dt_proj(dbl[..., :R])[0].to(dtype))
        return dt, copy_to_tp(dbl[..., R:R + N]).to(dtype), copy_to_tp(dbl[..., R + N:]).to(dtype)

    def _sequence(self, hidden_states, keep_state: bool = False):
        """(output, state after the last position or None): forward and prefill in one pass."""
        dtype = compute_dtype(hidden_states)
        raw = self.in_x(hidden_states)[0].permute(1, 2, 0)  # [b, E, s]
        x = self.conv(raw)
        dt, B, C = self._dt_B_C(x.permute(2, 0, 1), dtype)  # [s, b, *]
        A = -self.A_log.to(dtype).exp()
        y, h = selective_scan(x.to(dtype), dt.permute(1, 2, 0), A, B.permute(1, 2, 0), C.permute(1, 2, 0),
                              self.D.to(dtype), self.chunk_size)
        y = y.permute(2, 0, 1) * F.silu(self.in_z(hidden_states)[0].to(dtype))
        out = self.out(y.to(hidden_states.dtype))[0]
        return out, ({"conv": self.conv.prefill_state(raw), "h": h} if keep_state else None)

    def forward(self, hidden_states, attention_mask=None, token_ids=None, **ignored):
        return self._sequence(hidden_states)[0], None

    def prefill(self, hidden_states):
        """x [s, b, d] -> (forward's output, its bias (None), the decoding state after position s - 1)."""
        y, state = self._sequence(hidden_states, keep_state=True)
        return y, None, state

    def initial_state(self, batch: int, dtype=torch.float32, device=None) -> dict:
        """Zero state: the conv buffer [b, E_local, d_conv - 1] and h [b, E_local, N]."""
        E = self.D.shape[0]
        return {"conv": self.conv.initial_state(batch, dtype, device),
                "h": torch.zeros(batch, E, self.d_state, dtype=dtype, device=device)}

    def step(self, u: torch.Tensor, state: dict):
        """One position: u [b, d] -> (y [b, d], new state); equal to forward over a sequence, token by token."""
        dtype = compute_dtype(u)
        x, conv = self.conv.step(self.in_x(u)[0], state["conv"])
        dt, B, C = self._dt_B_C(x, dtype)
        y, h = selective_scan_step(state["h"], x.to(dtype), dt, -self.A_log.to(dtype).exp(), B, C, self.D.to(dtype))
        y = y * F.silu(self.in_z(u)[0].to(dtype))
        return self.out(y.to(u.dtype))[0], {"conv": conv, "h": h}


def _validate(shape, args):
    errors = []
    check_int(errors, "mamba", args, "d_state", 1, "use a positive int (the reference's: 16)")
    check_int(errors, "mamba", args, "d_conv", 1, "use a positive kernel size (the reference's: 4)")
    check_int(errors, "mamba", args, "expand", 1, "use a positive int (inner channels / hidden_size), e.g. 2")
    check_int(errors, "mamba", args, "dt_rank", 0, "use a positive int, or 0 for ceil(hidden_size / 16)")
    ok = check_number(errors, "mamba", args, "dt_min", "use a positive number, e.g. 0.001")
    ok &= check_number(errors, "mamba", args, "dt_max", "use a positive number, e.g. 0.1")
    if ok and args["dt_min"] > args["dt_max"]:
        errors.append(f"mamba.dt_min: {args['dt_min']!r} is above dt_max {args['dt_max']!r}; use dt_min <= dt_max")
    if args["dt_init"] not in DT_INITS:
        errors.append(f"mamba.dt_init: {args['dt_init']!r}; use 'random' (the reference's) or 'constant'")
    check_number(errors, "mamba", args, "dt_scale", "use a positive number, e.g. 1.0")
    check_number(errors, "mamba", args, "dt_init_floor", "use a positive number, e.g. 1e-4")
    check_bool(errors, "mamba", args, "conv_bias")
    check_bool(errors, "mamba", args, "bias")
    check_bool(errors, "mamba", args, "x_proj_bias")
    check_bool(errors, "mamba", args, "mlp")
    check_int(errors, "mamba", args, "chunk_size", 1, "use a positive int, e.g. 32")
    check_projection_init(errors, "mamba", args)
    return errors


def _flops(shape, args):
    d, N = shape.hidden_size, args["d_state"]
    E, R = args["expand"] * d, args["dt_rank"] or math.ceil(d / 16)
    f = 2 * flops.linear(d, E) + flops.linear(E, R + 2 * N) + flops.linear(R, E) + flops.linear(E, d)
    return f + flops.short_conv(E, args["d_conv"]) + 4.0 * E * N  # the scan: dt x B in, C . h out


def _state_bytes(shape, args, seq_len):
    """h [E, N] and the conv's last d_conv - 1 inputs per inner channel."""
    E = args["expand"] * shape.hidden_size
    return E * (args["d_state"] + args["d_conv"] - 1) * STATE_BYTES


register(
    MixerSpec(
        name="mamba",
        module=Mamba,
        defaults={"d_state": 16, "d_conv": 4, "expand": 2, "dt_rank": 0, "dt_min": 1e-3, "dt_max": 1e-1,
                  "dt_init": "random", "dt_scale": 1.0, "dt_init_floor": 1e-4, "conv_bias": True, "bias": False,
                  "x_proj_bias": False, "chunk_size": 32, "mlp": False, "projection_init": "kaiming_uniform"},
        tp_split="channels",
        flops=_flops,
        validate=_validate,
        state_bytes=_state_bytes,
        has_mlp=lambda args: bool(args["mlp"]),
        # GPT-NeoX's switches: its in_proj, x_proj and out_proj share one bias switch
        neox_keys={"mamba_use_bias_in_conv": ("conv_bias",), "mamba_use_bias_in_linears": ("bias", "x_proj_bias")},
        neox_defaults={"projection_init": "init_method"},  # GPT-NeoX's Mamba: in/x/out_proj take init_method
        doc="Mamba (S6): input-dependent dt, B, C; A = -exp(A_log) (S4D-real); D skip; short conv; SiLU-gated "
            "output; chunked scan; `mlp: false`: the block is norm + Mamba only (the reference's and GPT-NeoX's), "
            "`true` adds the configured MLP; `projection_init: kaiming_uniform`: nn.Linear's default, W_o / "
            "sqrt(num_layers) (the reference's), `init_method`: the model's (GPT-NeoX's; set for configs with its "
            "`mamba_*` keys)",
        tp_note="inner",
    )
)

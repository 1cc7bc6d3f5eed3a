"""Long convolution, the Zoology paper's "Long Conv" baseline (Fu et al. 2023c, safari's LongConv layer):

    k = relu(|K| - lam) * sign(K)          squash of an explicit filter K [d, L], K ~ N(0, 1) * init_scale
    z = gelu(k * u + D * u)                causal FFT convolution per channel, D ~ N(0, 1)
    y = GLU(W_o z + b_o)                   W_o: d -> 2d, GLU(a | g) = a * sigmoid(g)
                                           (`glu: false`: y = W_o z + b_o with W_o: d -> d)

No input projection and no data-dependent gating: the layer is the S4 block with its SSM kernel
replaced by an explicit filter, which is how the published baseline is built (safari's LongConv:
kernel + D skip, GELU, a Linear(d, 2d) + GLU output). Keeping that layout also keeps the published
parameter counts: d L + 2 d^2 per layer equals attention's 4 d^2 at d = 1024, L = 2048, so the 24-layer
360M attention shape gives the 360M long-conv model.

The squash is applied in every forward (it is the filter's regulariser, not a one-off projection), so
taps with |K| <= lam output 0 and get no gradient; with the defaults (init 0.002, lam 0.003) most taps
start that way, as in the reference.

Tensor parallelism: channels split. The filter and D hold this rank's channels, the input enters
the TP region with `copy_to_tp`, and W_o is row-parallel (its 2d outputs are whole after the
reduction, so the GLU runs on the full width).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neox_zoology import flops
from neox_zoology.mixers.base import Mixer, full_then_local, local_channels, row_linear_channels_first
from neox_zoology.mixers.fftconv import causal_conv_step, fft_causal_conv
from neox_zoology.mixers.filters import ExplicitLongFilter
from neox_zoology.parallel import RowLinear, copy_to_tp, mark_tp_param, tp_slice
from neox_zoology.registry import STATE_BYTES, MixerSpec, register


class LongConv(Mixer):
    def __init__(self, config, layer_number: int = 1, *, seq_length: int, lam: float = 0.003,
                 init_scale: float = 0.002, glu: bool = True, **stack_kwargs):
        super().__init__(config, layer_number, **stack_kwargs)
        d = config.hidden_size
        self.local = tp_slice(d)
        self.lam = lam
        self.decode_limit = seq_length  # the explicit filter has seq_length taps
        self.glu = glu
        self.filter = ExplicitLongFilter(d, seq_length, init_scale, config.params_dtype)
        self.D = mark_tp_param(nn.Parameter(full_then_local(torch.randn(d), 0, self.local).to(config.params_dtype)))
        self.out_proj = RowLinear(d, 2 * d if glu else d, config=config, init_method=config.output_layer_init_method,
                                  bias=True, input_is_parallel=True, skip_bias_add=False)

    def kernel(self, L: int) -> torch.Tensor:
        """The squashed filter [d_local, L] that the convolution uses."""
        k = self.filter(L)
        return torch.relu(k.abs() - self.lam) * torch.sign(k)

    def forward(self, hidden_states, attention_mask=None, token_ids=None, **ignored):
        s = hidden_states.shape[0]
        u = local_channels(copy_to_tp(hidden_states), self.local).permute(1, 2, 0).contiguous()  # [b, d_local, s]
        z = F.gelu(fft_causal_conv(u, self.kernel(s), skip=self.D))  # k * u + D u
        y = row_linear_channels_first(z, self.out_proj)  # [s, b, 2d]
        return (F.glu(y, dim=-1) if self.glu else y), None

    # -- decoding: the input history (O(L) per position, at most seq_length positions)
    def initial_state(self, batch: int, dtype=torch.float32, device=None) -> torch.Tensor:
        return torch.zeros(batch, self.local.stop - self.local.start, 0, dtype=dtype, device=device)

    def prefill_state(self, x: torch.Tensor) -> torch.Tensor:
        return local_channels(x, self.local).permute(1, 2, 0).contiguous()

    def step(self, x: torch.Tensor, state: torch.Tensor):
        """One position: x [b, h] -> (y [b, h], new state); equal to forward's output at that position."""
        z, state = causal_conv_step(state, local_channels(x, self.local), self.kernel(state.shape[-1] + 1), skip=self.D)
        y, _ = self.out_proj(F.gelu(z))
        return (F.glu(y, dim=-1) if self.glu else y), state


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _validate(shape, args):
    errors = []
    if not _number(args["lam"]) or args["lam"] < 0:
        errors.append(f"long_conv.lam: {args['lam']!r}; use a number >= 0 (the squash threshold), e.g. 0.003")
    if not _number(args["init_scale"]) or args["init_scale"] <= 0:
        errors.append(f"long_conv.init_scale: {args['init_scale']!r}; use a positive number (std of the filter "
                      f"at init), e.g. 0.002")
    if not isinstance(args["glu"], bool):
        errors.append(f"long_conv.glu: {args['glu']!r}; use true (Linear(d, 2d) + GLU output) or false")
    return errors


def _flops(shape, args):
    d = shape.hidden_size
    return flops.fft_conv(d, shape.seq_length) + flops.linear(d, 2 * d if args["glu"] else d)


def _state_bytes(shape, args, seq_len):
    """A filter as long as the sequence: the whole input history."""
    return seq_len * shape.hidden_size * STATE_BYTES


register(
    MixerSpec(
        name="long_conv",
        module=LongConv,
        defaults={"lam": 0.003, "init_scale": 0.002, "glu": True},
        tp_split="channels",
        flops=_flops,
        validate=_validate,
        state_bytes=_state_bytes,
        doc="long convolution without gating (Fu et al. 2023c): squashed explicit filter + `D` skip → GELU → GLU "
            "projection",
    )
)

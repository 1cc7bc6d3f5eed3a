"""Zoology's BaseConv: y = conv(u) * (W u + b) + u.

The filter is chosen per layer: a short depthwise causal conv (kernel_size k > 0) or a long
convolution over the whole sequence (kernel_size -1), implicit (an MLP over positional features) or
explicit (a learned d x L filter). `kernel_sizes` cycles over the BaseConv layers of a model in
order, like Zoology's `kernel_size=[3, -1]` list (the j-th BaseConv layer gets entry j mod len).

As in the reference code (zoology's `fft_conv`), the long convolution carries a skip: conv(u) = k*u + u,
so a long layer computes (k*u + u) * (W u + b) + u (`fft_skip: true`, the default). The paper's listing
has no such skip: `fft_skip: false`. Short filters never have it. The implicit filter's MLP starts as the
reference's language model initialises it (`filter_init: normal`: N(0, init_method_std), zero biases);
`filter_init: kaiming_uniform` keeps nn.Linear's default instead (see filters.FILTER_INITS).

Tensor parallelism: channels split. W is column-parallel, the filter and the gate are computed on
the local channels, and the product is all-gathered back to [s, b, h] (BaseConv has no output
projection to fold the gather into).
"""
from __future__ import annotations

import torch

from neox_zoology import flops
from neox_zoology.mixers.base import Mixer, column_linear_channels_first, local_channels
from neox_zoology.mixers.fftconv import causal_conv_step, fft_causal_conv
from neox_zoology.mixers.filters import FILTER_INITS, ExplicitLongFilter, ImplicitLongFilter, ShortFilter
from neox_zoology.parallel import ColumnLinear, copy_to_tp, gather_from_tp, tp_slice
from neox_zoology.registry import STATE_BYTES, MixerSpec, register


class BaseConv(Mixer):
    def __init__(
        self,
        config,
        layer_number: int = 1,
        *,
        seq_length: int,
        kernel_size: int = 3,
        long_filter: str = "implicit",
        filter_emb_dim: int = 3,
        filter_hidden: int = 16,
        fft_skip: bool = True,
        use_act: bool = False,
        filter_init: str = "normal",
        **stack_kwargs,
    ):
        super().__init__(config, layer_number, **stack_kwargs)
        d = config.hidden_size
        self.local = tp_slice(d)
        self.kernel_size = kernel_size
        self.fft_skip = fft_skip
        self.use_act = use_act
        self.decode_limit = seq_length if kernel_size <= 0 else None
        """Positions a decoder can reach: a long filter is defined for seq_length positions."""
        self.proj = ColumnLinear(d, d, config=config, init_method=config.init_method, bias=True, gather_output=False)
        if kernel_size > 0:
            self.filter = ShortFilter(d, kernel_size, config.params_dtype)
        elif long_filter == "implicit":
            self.filter = ImplicitLongFilter(d, seq_length, config, filter_emb_dim, filter_hidden, filter_init)
        else:
            self.filter = ExplicitLongFilter(d, seq_length, params_dtype=config.params_dtype)

    def conv(self, u):
        """u [b, d_local, L] -> the causal filter applied per channel."""
        if self.kernel_size > 0:
            return self.filter(u)
        return fft_causal_conv(u, self.filter(u.shape[-1]), skip=1.0 if self.fft_skip else None)

    def forward(self, hidden_states, attention_mask=None, token_ids=None, **ignored):
        u = copy_to_tp(hidden_states)  # [s, b, h], replicated over TP ranks
        # channels-first [b, h/tp, s]: the filter runs along contiguous rows, the product stays in that layout
        gate = column_linear_channels_first(u, self.proj, entered=True)
        conv = self.conv(local_channels(u, self.local).permute(1, 2, 0).contiguous())
        if self.use_act:
            conv, gate = conv * conv.sigmoid(), gate * gate.sigmoid()
        return gather_from_tp((conv * gate).permute(2, 0, 1)) + hidden_states, None

    # -- decoding: a short filter keeps its last k - 1 inputs; a long one the whole input history (O(L) per
    # position, at most seq_length positions: the filter is defined that far)
    def initial_state(self, batch: int, dtype=torch.float32, device=None) -> torch.Tensor:
        if self.kernel_size > 0:
            return self.filter.initial_state(batch, dtype, device)
        return torch.zeros(batch, self.local.stop - self.local.start, 0, dtype=dtype, device=device)

    def prefill_state(self, x: torch.Tensor) -> torch.Tensor:
        """The state after the positions of x [s, b, h]."""
        u = local_channels(x, self.local).permute(1, 2, 0).contiguous()
        return self.filter.prefill_state(u) if self.kernel_size > 0 else u

    def step(self, x: torch.Tensor, state: torch.Tensor):
        """One position: x [b, h] -> (y [b, h], new state); equal to forward's output at that position."""
        gate, _ = self.proj(x)
        u = local_channels(x, self.local)
        if self.kernel_size > 0:
            conv, state = self.filter.step(u, state)
        else:
            k = self.filter(state.shape[-1] + 1)
            conv, state = causal_conv_step(state, u, k, skip=1.0 if self.fft_skip else None)
        if self.use_act:
            conv, gate = conv * conv.sigmoid(), gate * gate.sigmoid()
        return gather_from_tp(conv * gate) + x, state


LONG_ONLY = ("long_filter", "filter_emb_dim", "filter_hidden", "fft_skip", "filter_init")
"""Keys that only a long-filter layer uses: a short layer's module kwargs leave them out."""


def _per_layer(args, occurrence):
    ks = args["kernel_sizes"]
    ks = ks if isinstance(ks, (list, tuple)) else [ks]
    kernel_size = int(ks[occurrence % len(ks)])
    out = {k: v for k, v in args.items() if k != "kernel_sizes" and (kernel_size < 0 or k not in LONG_ONLY)}
    out["kernel_size"] = kernel_size
    return out


def _validate(shape, args):
    errors = []
    ks = args["kernel_sizes"]
    ks = ks if isinstance(ks, (list, tuple)) else [ks]
    if not ks:
        errors.append("baseconv.kernel_sizes: []; list at least one filter size, e.g. [3, -1]")
    for k in ks:
        if not isinstance(k, int) or isinstance(k, bool) or not (k == -1 or 0 < k <= shape.seq_length):
            errors.append(
                f"baseconv.kernel_sizes: {k!r} is not a filter size; use a positive int <= seq_length "
                f"({shape.seq_length}) for a short filter or -1 for a long one"
            )
    if args["long_filter"] not in ("implicit", "explicit"):
        errors.append(f"baseconv.long_filter: {args['long_filter']!r}; use 'implicit' or 'explicit'")
    e, h = args["filter_emb_dim"], args["filter_hidden"]
    if not isinstance(e, int) or isinstance(e, bool) or e < 3 or e % 2 == 0:
        errors.append(f"baseconv.filter_emb_dim: {e!r}; use an odd int >= 3 (t plus cos/sin pairs), e.g. 3")
    if not isinstance(h, int) or isinstance(h, bool) or h <= 0:
        errors.append(f"baseconv.filter_hidden: {h!r}; use a positive int (the filter MLP width), e.g. 16")
    for key in ("fft_skip", "use_act"):
        if not isinstance(args[key], bool):
            errors.append(f"baseconv.{key}: {args[key]!r}; use true or false")
    if args["filter_init"] not in FILTER_INITS:
        errors.append(f"baseconv.filter_init: {args['filter_init']!r}; use {' or '.join(map(repr, FILTER_INITS))}")
    return errors


def _flops(shape, args):
    d, L = shape.hidden_size, shape.seq_length
    k = args["kernel_size"]
    f = flops.linear(d, d)
    if k > 0:
        f += flops.short_conv(d, k)
    else:
        f += flops.fft_conv(d, L)
        if args.get("long_filter", "implicit") == "implicit":  # filter MLP, once per sequence
            f += (flops.linear(args["filter_emb_dim"], args["filter_hidden"]) + flops.linear(args["filter_hidden"], d))
    return f


def _state_bytes(shape, args, seq_len):
    """A short filter of k taps keeps the last k - 1 inputs; a long filter the whole input history."""
    k = args.get("kernel_size", args.get("kernel_sizes", [3])[0])
    return (k - 1 if 0 < k <= seq_len else seq_len) * shape.hidden_size * STATE_BYTES


register(
    MixerSpec(
        name="baseconv",
        module=BaseConv,
        defaults={
            "kernel_sizes": [3, -1],
            "long_filter": "implicit",
            "filter_emb_dim": 3,
            "filter_hidden": 16,
            "fft_skip": True,
            "use_act": False,
            "filter_init": "normal",
        },
        tp_split="channels",
        flops=_flops,
        validate=_validate,
        per_layer=_per_layer,
        state_bytes=_state_bytes,
        doc="Zoology BaseConv `y = conv(u) ⊙ (W u + b) + u`; a long filter's convolution is `k*u + u` as in "
            "zoology's code",
    )
)

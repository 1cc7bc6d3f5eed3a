"""What every mixer shares: megatron-core's `self_attention` calling convention.

A mixer is built as `Cls(config: TransformerConfig, layer_number, **mixer_kwargs)` and called as
`mixer(hidden_states[s, b, h], attention_mask=None, token_ids=None, **ignored) -> (out[s, b, h], bias)`,
so the same class drops into megatron-core's `TransformerLayer` through a `ModuleSpec`.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import nn
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class Mixer(MegatronModule):
    """Base class: keeps the config and swallows the stack-specific constructor kwargs."""

    def __init__(self, config: TransformerConfig, layer_number: int = 1, **stack_kwargs):
        # megatron-core's TransformerLayer passes its process-group collection / cp_comm_type; the
        # mixers use parallel_state's default groups, which is what that collection holds.
        stack_kwargs.pop("pg_collection", None)
        stack_kwargs.pop("cp_comm_type", None)
        if stack_kwargs:
            raise TypeError(f"{type(self).__name__}: unexpected arguments {sorted(stack_kwargs)}")
        super().__init__(config=config)
        self.layer_number = layer_number

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, token_ids=None, **ignored):
        raise NotImplementedError


NO_WEIGHT_DECAY = "zoo_no_weight_decay"


def exclude_from_weight_decay(module_or_param):
    """Mark the parameters of a long filter or SSM kernel: the optimizer gives them weight decay 0.

    As in the H3 / Hyena / S4 references, which take the kernel parameters out of weight decay;
    projections and short (few-tap) filters keep the configured decay.
    """
    params = [module_or_param] if isinstance(module_or_param, torch.nn.Parameter) else module_or_param.parameters()
    for p in params:
        setattr(p, NO_WEIGHT_DECAY, True)
    return module_or_param


PROJECTION_INITS = ("kaiming_uniform", "init_method")  # the reference's nn.Linear default | the model's init_method


def torch_linear_default(weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """nn.Linear's default weight init, U(+-1/sqrt(fan_in)), on the full-size [out, in] weight, times `scale`."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if scale != 1.0:
        with torch.no_grad():
            weight.mul_(scale)
    return weight


def projection_inits(config, projection_init: str):
    """(inner, output) init functions: `kaiming_uniform` -> nn.Linear's default, the output one divided by
    sqrt(config.num_layers) (state-spaces/mamba's and zoology's `_init_weights` for Mamba blocks); `init_method` ->
    the model's init_method and output_layer_init_method."""
    if projection_init == "kaiming_uniform":
        return torch_linear_default, functools.partial(torch_linear_default, scale=max(config.num_layers, 1) ** -0.5)
    return config.init_method, config.output_layer_init_method


def check_projection_init(errors: list, name: str, args: dict) -> None:
    if args["projection_init"] not in PROJECTION_INITS:
        errors.append(f"{name}.projection_init: {args['projection_init']!r}; use 'kaiming_uniform' (the reference's) "
                      f"or 'init_method' (the model's init_method and output_layer_init_method)")


def full_then_local(full: torch.Tensor, dim: int, local: slice) -> torch.Tensor:
    """Take this rank's slice of a tensor initialised at full size.

    Drawing the full tensor on every rank (as megatron-core's CPU initialisation does for its own
    layers) makes a model's initial weights independent of the tensor-parallel size.
    """
    index = [slice(None)] * full.dim()
    index[dim] = local
    return full[tuple(index)].contiguous()


def column_linear_channels_first(x: torch.Tensor, linear, entered: bool = False) -> torch.Tensor:
    """A column-parallel layer applied to x [s, b, h], returned channels-first: [b, out_local, s], contiguous.

    The same product as `linear(x)` followed by `.permute(1, 2, 0)`, computed as one batched matmul
    W @ x_b^T into the layout the convolutions want; the transposed copies this avoids (and the
    strided gradients they leave behind) cost about as much as the product itself on CPU.
    `entered`: x already went through `copy_to_tp`.
    """
    from neox_zoology.parallel import copy_to_tp

    x = (x if entered else copy_to_tp(x)).permute(1, 2, 0)  # [b, h, s] view
    w = linear.weight.expand(x.shape[0], -1, -1)
    if linear.bias is None:
        return torch.bmm(w, x)
    return torch.baddbmm(linear.bias[None, :, None], w, x)


def row_linear_channels_first(z: torch.Tensor, linear) -> torch.Tensor:
    """A row-parallel layer applied to channels-first z [b, in_local, s]: returns [s, b, out] (plus bias).

    The same as `linear(z.permute(2, 0, 1))[0]`: per-rank partial products, summed over TP ranks.
    """
    from neox_zoology.parallel import reduce_from_tp

    w = linear.weight.t().expand(z.shape[0], -1, -1)
    y = reduce_from_tp(torch.bmm(z.transpose(1, 2), w))  # [b, s, out]
    y = y.transpose(0, 1)
    return y if linear.bias is None else y + linear.bias


def local_channels(x: torch.Tensor, local: slice) -> torch.Tensor:
    """x[..., local]; x itself when the slice is every channel (TP = 1), so backward adds no zero-fill."""
    if local.start in (0, None) and local.stop in (x.shape[-1], None):
        return x
    return x[..., local]

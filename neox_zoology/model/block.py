"""A layer: pre-norm residual block around a registered mixer and an MLP.

    x = x + mixer(norm1(x));  x = x + mlp(norm2(x))        (or, with gpt_j_residual,
    x = x + mixer(norm1(x)) + mlp(norm2(x)));  x = x + mixer(norm1(x)) where the type's
    `MixerSpec.has_mlp` says the block has no MLP

Activations are sequence-first [s, b, h] as in megatron-core. Pipeline layers pass the tuple
(hidden, token_ids): token ids ride along so that mixers which select positions from raw tokens can
use them on any pipeline stage.

Two optional fast paths live here, both leaving parameters and state-dict keys unchanged:

- fused norms (`fused_norms`, default on): `LayerNorm` / `RMSNorm` are torch's modules; when NVIDIA
  apex's fused kernels are importable they run apex's FusedLayerNorm / FusedRMSNorm kernel for CUDA
  inputs and torch's own otherwise (decided per call from the input's device and dtype, see
  `FusedNormMixin`), so checkpoints move freely between machines with and without apex.
- `compile: true`: each block's mixer is compiled in place with torch.compile (see `compile_mixer`).
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from neox_zoology import registry
from neox_zoology.parallel import ColumnLinear, RowLinear, tp_size

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- norms


@functools.lru_cache(maxsize=None)
def apex_fused_norm_functions():
    """apex's fused (layer_norm_affine, rms_norm_affine) functions, or None when apex or its CUDA
    extension (`fused_layer_norm_cuda`, built with apex's --cuda_ext) is not installed.

    (The PyPI package called `apex` is an unrelated web toolkit: without `apex.normalization` it counts
    as absent.)
    """
    try:
        import importlib

        from apex.normalization.fused_layer_norm import fused_layer_norm_affine, fused_rms_norm_affine

        importlib.import_module("fused_layer_norm_cuda")
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return fused_layer_norm_affine, fused_rms_norm_affine


class FusedNormMixin:
    """Runs apex's fused kernel instead of torch's when it can, on the same parameters.

    The choice is made per call, not at build time: the model is built on the CPU
    (`use_cpu_initialization`) and moved to the GPU afterwards, and the same module may later
    evaluate CPU tensors. The fused kernel is used when `fused` is set (the `fused_norms` key and
    apex importable, checked once at build time), the input is a CUDA tensor of the parameters'
    dtype, and no torch.compile trace is running; otherwise torch's norm runs.
    """

    def __init__(self, hidden_size: int, eps: float, fused: bool = False, **norm_kwargs):
        super().__init__(hidden_size, eps=eps, **norm_kwargs)
        self.fused = fused

    def use_fused(self, x: torch.Tensor) -> bool:
        return (self.fused and x.is_cuda and x.dtype == self.weight.dtype
                and not torch.compiler.is_compiling())


class LayerNorm(FusedNormMixin, nn.LayerNorm):
    """torch.nn.LayerNorm (parameters `weight`, `bias`); apex's FusedLayerNorm kernel on CUDA inputs."""

    def forward(self, x):
        if self.use_fused(x):
            layer_norm, _ = apex_fused_norm_functions()
            return layer_norm(x, self.weight, self.bias, self.normalized_shape, self.eps)
        return super().forward(x)


class RMSNorm(FusedNormMixin, nn.RMSNorm):
    """torch.nn.RMSNorm (parameter `weight`); apex's FusedRMSNorm kernel on CUDA inputs."""

    def forward(self, x):
        if self.use_fused(x):
            _, rms_norm = apex_fused_norm_functions()
            return rms_norm(x, self.weight, self.normalized_shape, self.eps)
        return super().forward(x)


def build_norm(args) -> nn.Module:
    """The block / final norm. `fused_norms: true` (default) uses apex's kernels where available;
    `use_bias_in_norms: false` leaves the LayerNorm without its bias."""
    fused = bool(getattr(args, "fused_norms", False)) and apex_fused_norm_functions() is not None
    if args.norm == "rmsnorm":
        return RMSNorm(args.hidden_size, eps=args.rms_norm_epsilon, fused=fused)
    return LayerNorm(args.hidden_size, eps=args.layernorm_epsilon, fused=fused,
                     bias=getattr(args, "use_bias_in_norms", True))


# ----------------------------------------------------------------------------- torch.compile


COMPILE_OPTIONS = {"fallback_random": True}
"""Inductor options of compiled mixers. `fallback_random`: random ops (attention dropout) draw from
torch's generator exactly as in eager mode, so a compiled mixer gives the same dropout masks as an
eager one and activation checkpointing's recompute (a no-grad graph first, a grad graph in backward,
RNG state restored in between) replays them."""


def compile_mixer(mixer: nn.Module) -> bool:
    """Compile `mixer` in place with torch.compile (dynamic=False); True if it was compiled.

    In place (`nn.Module.compile`), so parameters, state-dict keys and hooks stay those of the eager
    module. Not compiled: mixers whose class sets `supports_compile = False` (kernels with
    data-dependent shapes and Python-side state of their own).

    With tensor parallelism > 1, megatron-core's tensor-parallel package (its TP linear layers, the
    copy/gather/reduce mappings and their autograd functions) is not traced: every call into it is a
    graph break and runs eagerly, and only the mixer's own computation between those calls is
    compiled. (Traced, at TP = 2 on torch 2.13, BaseConv with its implicit long filter, whose
    column-parallel linear sits in one graph with the mixer's copy-to / gather-from mappings, got
    wrong input gradients without any error, although each of these pieces compiled alone was right.)
    At TP = 1 megatron-core's layers run no collective and are traced like the rest.
    """
    if not getattr(mixer, "supports_compile", True):
        return False
    if tp_size() > 1 and not _keep_tensor_parallel_eager():
        log.warning("compile: torch.compile cannot be kept out of megatron-core's tensor-parallel layers in this "
                    "torch version; %s runs eagerly", type(mixer).__name__)
        return False
    mixer.compile(dynamic=False, options=COMPILE_OPTIONS)
    return True


@functools.lru_cache(maxsize=None)
def _keep_tensor_parallel_eager() -> bool:
    """Tell dynamo not to trace megatron-core's tensor_parallel package (process-wide, once)."""
    try:
        from torch._dynamo import trace_rules

        trace_rules.add("megatron.core.tensor_parallel")
    except Exception:  # noqa: BLE001 - an older/newer torch without this hook: do not compile under TP
        return False
    return True


def _tanh_gelu(x):
    return F.gelu(x, approximate="tanh")


ACTIVATION_FUNCTIONS = {
    # GPT-NeoX's activation names -> (function, gated)
    "gelu": (F.gelu, False), "relu": (F.relu, False), "silu": (F.silu, False), "swish": (F.silu, False),
    "softsign": (F.softsign, False), "mish": (F.mish, False),
    "geglu": (F.gelu, True), "reglu": (F.relu, True), "swiglu": (F.silu, True),
    "bilinear": (lambda x: x, True), "glu": (torch.sigmoid, True),
}


def activation_function(name: str, tanh_gelu: bool = False):
    """(function, gated) of a GPT-NeoX activation name; `tanh_gelu` (bias_gelu_fusion) makes a plain gelu
    the tanh approximation, as GPT-NeoX's fused bias-GELU kernel computes it."""
    fn, gated = ACTIVATION_FUNCTIONS[name]
    if name == "gelu" and tanh_gelu:
        fn = _tanh_gelu
    return fn, gated


class MLP(nn.Module):
    """down(act(up x)), or down(act(gate x) * up x) for a gated activation (gate and up projections kept
    separate so TP shards stay aligned); `ffn` is the hidden width (of each projection when gated)."""

    def __init__(self, config, ffn: int, gated: bool, bias: bool, activation: str | None = None,
                 tanh_gelu: bool = False):
        super().__init__()
        h = config.hidden_size
        col = dict(config=config, init_method=config.init_method, bias=bias, gather_output=False)
        name = activation or ("swiglu" if gated else "gelu")
        self.act, self.gated = activation_function(name, tanh_gelu)
        if self.gated != gated:
            raise ValueError(f"activation {name} is {'' if self.gated else 'not '}gated")
        self.up = ColumnLinear(h, ffn, **col)
        self.gate = ColumnLinear(h, ffn, **col) if gated else None
        self.down = RowLinear(
            ffn, h, config=config, init_method=config.output_layer_init_method, bias=bias, input_is_parallel=True,
            skip_bias_add=False,
        )

    def forward(self, x):
        up, _ = self.up(x)
        if self.gated:
            g, _ = self.gate(x)
            up = self.act(g) * up
        else:
            up = self.act(up)
        y, _ = self.down(up)
        return y


def activation_checkpoint(function, *inputs):
    """megatron-core's `tensor_parallel.checkpoint`: keeps the inputs, recomputes `function` in backward
    with the CPU, CUDA and model-parallel RNG states of the first pass (dropout and random selections
    draw the same numbers twice)."""
    from megatron.core import tensor_parallel

    return tensor_parallel.checkpoint(function, False, *inputs)


class ZooBlock(nn.Module):
    """One layer. The class name is what `pipe_partition_method: type:ZooBlock` balances over."""

    def __init__(self, args, config, layer_number: int, layer_type: str, occurrence: int):
        super().__init__()
        spec = registry.get(layer_type)
        self.layer_type = spec.name
        self.needs_token_ids = spec.needs_token_ids
        self.parallel_residual = args.gpt_j_residual
        self.input_norm = build_norm(args)
        self.mixer = spec.module(
            config, layer_number, seq_length=args.seq_length,
            **spec.per_layer(args.mixer_args(layer_type), occurrence),
        )
        self.has_mlp = spec.has_mlp(args.mixer_args(layer_type))
        """False: norm + mixer only (no MLP and no second norm), as the type's section asks."""
        self.post_norm = build_norm(args) if self.has_mlp else None
        self.compiled = bool(getattr(args, "compile", False)) and compile_mixer(self.mixer)
        """Whether the mixer runs compiled (`compile: true` and the mixer supports it)."""
        if not self.has_mlp:
            self.mlp = None
        elif spec.mlp is not None:
            self.mlp = spec.mlp(config, layer_number)
        else:
            self.mlp = MLP(config, args.mlp_width, args.gated_mlp, args.use_bias_in_mlp, args.activation,
                           tanh_gelu=args.bias_gelu_fusion)
        self.dropout = nn.Dropout(args.hidden_dropout)
        self.recompute = False
        """Activation checkpointing of this block alone (set by the pipeline engine's builder)."""

    def forward(self, inputs):
        if self.recompute and self.training and torch.is_grad_enabled():
            return activation_checkpoint(self._body, *inputs)
        return self._body(*inputs)

    def _body(self, x, token_ids):
        m, bias = self.mixer(self.input_norm(x), token_ids=token_ids if self.needs_token_ids else None)
        if bias is not None:
            m = m + bias
        if self.mlp is None:
            x = x + self.dropout(m)
        elif self.parallel_residual:
            x = x + self.dropout(m) + self.dropout(self.mlp(self.post_norm(x)))
        else:
            x = x + self.dropout(m)
            x = x + self.dropout(self.mlp(self.post_norm(x)))
        return x, token_ids

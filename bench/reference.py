"""Our mixers against the reference code they reproduce: parity, initialisation and speed.

    python -m bench.reference --zoology PATH [--safari PATH] [--batch 4 --hidden 256 --seq-len 1024]
                              [--rounds 5 --steps 3 --threads 1] [--mixers a,b] [--out FILE --md FILE]

The references are local checkouts the user points the benchmark at (nothing of them is vendored):
HazyResearch/zoology (`--zoology`, env `ZOOLOGY_REFERENCE`; measured at d88d6f5) for BaseConv, Hyena,
H3 and RWKV, and HazyResearch/safari (`--safari`, env `SAFARI_REFERENCE`) for the long convolution.
Their own dependencies must be importable (einops, pydantic; opt_einsum and scipy for H3); a mixer
whose reference cannot be imported is reported as skipped with the reason, and without a zoology
checkout the whole run is skipped (JSON with `skipped`, exit status 0).

Pairs (ours: `neox_zoology.build_mixer`, batch-first; reference: its module, [b, l, d]):

| variant | ours | reference |
|---|---|---|
| baseconv_short | baseconv, layer_index 0 (kernel 3) | zoology BaseConv(kernel_size=3) |
| baseconv_long | baseconv, layer_index 1 (implicit long) | zoology BaseConv(kernel_size=-1) |
| baseconv_long_explicit | baseconv, kernel_sizes [-1], long_filter explicit | zoology BaseConv(kernel_size=-1, implicit_long_conv=False) |
| hyena | hyena | zoology Hyena(l_max=L) |
| h3 | h3 | zoology H3(d_state=64, head_dim=1) |
| rwkv | rwkv (time mix) | zoology RWKVTimeMixer; its WKV is a CUDA kernel, replaced here by a torch port of that kernel's forward and backward loops (`WKVKernelPort`, run in the input's dtype: the kernel's fp32 mode) |
| long_conv | long_conv | safari's standalone LongConv(channels=1, kernel_lam=0.003), its kernel cut to L taps (the layer's causal kernel length; the standalone file keeps 2L taps, which wrap around in its 2L FFT) |

Three measurements per pair:

- parity (float64): the reference module is built, its parameters moved away from their init values
  (trained ones + 0.02 N(0, 1); the long-conv kernel redrawn at std 0.01 so that taps pass the squash) and copied into
  our mixer (`MAPPINGS`); on x ~ N(0, 1) [2, L, d] with a random output gradient, the relative error
  ||ours - ref|| / ||ref|| of the output, the input gradient and every parameter gradient (the worst one
  reported; every one of our parameters gets a reference value). The reference's H3 forms its SSM
  kernels in complex64 whatever the module dtype, so H3's figures are float32-limited.
- init: the std of the output at init for x ~ N(0, 1) [2, L_init, d] (BaseConv: of y - x, its output
  carries its input unchanged in both codes), averaged over `--init-seeds` seeds, at each `--init-hidden`.
  Ours: the mixer as `configs/neox/<type>_360m.yml` builds it, with hidden_size and seq_length
  overridden (its num_layers, init methods and YAML section kept; layer 1 for RWKV, whose layer ratios
  deliberately differ from the reference's after it). Reference: the module as constructed, then the
  reference language model's `_init_weights` (zoology's `model.py`: every nn.Linear N(0, 0.02) with zero
  bias, `out_proj`/`fc2`/`output_linear.0` weights N(0, 0.02 / sqrt(2 n_layers))) with the config's
  num_layers, applied as its LMBackbone applies it; safari's LM init has the same rules. Imported from
  the checkout (its training-only imports wandb, pandas, torchvision stubbed when absent).
- speed: forward + backward (`y.sum().backward()`) at `--batch`, `--hidden`, `--seq-len`, fp32, `--threads`
  torch threads; `--rounds` rounds alternating which of the pair goes first, each timing the median of
  `--steps` steps after a warm-up step; ratio = ours / reference per round, the median over rounds reported.

Targets: parity <= 1e-6 relative (float32-limited pairs noted), init ratio within [1/1.5, 1.5], speed
ratio <= 1.0.

stdout carries only the JSON; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import emit, loadavg, machine

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("baseconv_short", "baseconv_long", "baseconv_long_explicit", "hyena", "h3", "rwkv", "long_conv")
OURS = {  # variant -> (layer type, build_mixer kwargs, paper config used for the init statistic, layer index)
    "baseconv_short": ("baseconv", {"layer_index": 0}, "baseconv_360m.yml", 0),
    "baseconv_long": ("baseconv", {"layer_index": 1}, "baseconv_360m.yml", 1),
    "baseconv_long_explicit": ("baseconv", {"kernel_sizes": [-1], "long_filter": "explicit"}, None, 0),
    "hyena": ("hyena", {}, "hyena_360m.yml", 0),
    "h3": ("h3", {}, "h3_360m.yml", 0),
    "rwkv": ("rwkv", {}, "rwkv_360m.yml", 0),
    "long_conv": ("long_conv", {}, "long_conv_360m.yml", 0),
}
PARITY_TARGET = 1e-6
INIT_RANGE = (1 / 1.5, 1.5)
SPEED_TARGET = 1.0
FLOAT32_LIMITED = {"h3": "the reference forms its SSM kernels in complex64 (`_r2c` casts to float32)"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------- the references


class _Stub(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return object


@contextlib.contextmanager
def _stubbed(names):
    """Stand-ins for modules the references import at top level but the mixers never use."""
    added = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = _Stub(name)
            added.append(name)
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


def add_path(path: str | None) -> None:
    if path and path not in sys.path:
        sys.path.insert(0, path)


def checkout_commit(path: str | None) -> str | None:
    if not path:
        return None
    try:
        return subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


class WKVKernelPort(torch.autograd.Function):
    """The RWKV-4 WKV CUDA kernel (zoology `mixers/rwkv/v4/wkv_cuda.cu`) as torch loops over time.

    Same recurrences as the kernel, vectorised over (batch, channel) instead of one thread each:
    forward keeps (p, q) scaled by e^{-o}; backward runs its forward loop again for y and the w
    derivatives, then its reverse loop for the k, v gradients. Runs in the dtype it is given.
    """

    @staticmethod
    def forward(ctx, B, T, C, time_decay, time_first, k, v):
        w = -torch.exp(time_decay)
        u = time_first
        p = torch.zeros(B, C, dtype=k.dtype)
        q = torch.zeros_like(p)
        o = torch.full_like(p, -1e38)
        ys = []
        for i in range(T):
            kk, vv = k[:, i], v[:, i]
            no = torch.maximum(o, u + kk)
            a, b = torch.exp(o - no), torch.exp(u + kk - no)
            ys.append((a * p + b * vv) / (a * q + b))
            no = torch.maximum(w + o, kk)
            a, b = torch.exp(w + o - no), torch.exp(kk - no)
            p, q, o = a * p + b * vv, a * q + b, no
        ctx.save_for_backward(w, u, k, v)
        return torch.stack(ys, dim=1)

    @staticmethod
    def backward(ctx, gy):
        w, u, k, v = ctx.saved_tensors
        B, T, C = k.shape
        y, z, zexp = [], [], []
        gw = torch.zeros(B, C, dtype=k.dtype)
        gu = torch.zeros_like(gw)
        p, q, dpdw, dqdw = (torch.zeros_like(gw) for _ in range(4))
        o = torch.full_like(gw, -1e38)
        for i in range(T):
            kk, vv, g = k[:, i], v[:, i], gy[:, i]
            no = torch.maximum(o, kk + u)
            a, b = torch.exp(o - no), torch.exp(kk + u - no)
            num, iden = a * p + b * vv, 1 / (a * q + b)
            y.append(num * iden)
            z.append(iden)
            zexp.append(kk + u - no)
            gw = gw + g * (dpdw - dqdw * y[i]) * iden * a
            gu = gu + g * (vv - y[i]) * b * iden
            no = torch.maximum(w + o, kk)
            a, b = torch.exp(w + o - no), torch.exp(kk - no)
            dpdw, dqdw = a * (p + dpdw), a * (q + dqdw)
            p, q, o = a * p + b * vv, a * q + b, no
        gk, gv = torch.empty_like(k), torch.empty_like(v)
        gp, gq = torch.zeros_like(gw), torch.zeros_like(gw)
        o = torch.full_like(gw, -1e38)
        for i in range(T - 1, -1, -1):
            kk, vv, g = k[:, i], v[:, i], gy[:, i]
            a = g * z[i] * torch.exp(zexp[i])
            b = torch.exp(kk + o)
            gk[:, i] = a * (vv - y[i]) + b * (gp * vv + gq)
            gv[:, i] = a + b * gp
            no = torch.maximum(w + o, zexp[i] - kk - u)
            a = torch.exp(w + o - no)
            b = g * z[i] * torch.exp(zexp[i] - kk - u - no)
            gp, gq, o = a * gp + b, a * gq - b * y[i], no
        return None, None, None, (gw * w).sum(0), gu.sum(0), gk, gv


class References:
    """Constructors of the reference modules from the checkouts (None + reason where one cannot load)."""

    def __init__(self, zoology: str | None, safari: str | None):
        self.zoology, self.safari = zoology, safari
        self.errors: dict[str, str] = {}
        add_path(zoology)
        add_path(safari)
        self._init_weights = None
        try:
            with _stubbed(["wandb", "pandas", "torchvision", "torchvision.ops"]):
                from zoology.model import _init_weights
            self._init_weights = _init_weights
        except Exception as e:  # noqa: BLE001
            self.errors["init"] = f"zoology.model: {type(e).__name__}: {e}"

    def build(self, variant: str, d: int, L: int):
        if variant.startswith("baseconv"):
            from zoology.mixers.base_conv import BaseConv

            if variant == "baseconv_short":
                return BaseConv(d, L, kernel_size=3)
            return BaseConv(d, L, kernel_size=-1, implicit_long_conv=variant == "baseconv_long")
        if variant == "hyena":
            from zoology.mixers.hyena import Hyena

            return Hyena(d, l_max=L)
        if variant == "h3":
            from zoology.mixers.h3 import H3

            return H3(d, d_state=64, l_max=L, head_dim=1)
        if variant == "rwkv":
            import torch.utils.cpp_extension as cpp

            load, cpp.load = cpp.load, (lambda *a, **k: None)  # the module compiles its CUDA kernel on import
            try:
                rwkv = importlib.import_module("zoology.mixers.rwkv")
            finally:
                cpp.load = load
            rwkv.RUN_CUDA = lambda B, T, C, w, u, k, v: WKVKernelPort.apply(B, T, C, w, u, k, v)
            return rwkv.RWKVTimeMixer(l_max=L, d_model=d, layer_idx=0)
        if variant == "long_conv":
            if not self.safari:
                raise ImportError("no safari checkout (--safari / SAFARI_REFERENCE)")
            from standalone_long_convs import LongConv

            m = LongConv(d, L, channels=1, dropout=0.0, kernel_lam=0.003)
            m.kernel = torch.nn.Parameter(m.kernel.detach()[..., :L].clone())
            return _Transposed(m)
        raise KeyError(variant)

    def init_like_reference_model(self, module, n_layers: int):
        module.apply(lambda m: self._init_weights(m, n_layers=n_layers, block_type="TransformerBlock"))


class _Transposed(torch.nn.Module):
    """safari's standalone LongConv takes [b, d, l]; its LM layer transposes [b, l, d] the same way."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.transpose(1, 2)).transpose(1, 2)


# ------------------------------------------------------------------------- reference -> our parameters


def _perm_streams(d: int, streams: int = 3) -> torch.Tensor:
    """Our channel-major row c*streams + s <- the reference's stream-major row s*d + c."""
    return torch.tensor([s * d + c for c in range(d) for s in range(streams)])


def _map_baseconv(ref, ours, variant):
    out = {"proj.weight": ref.projection.weight, "proj.bias": ref.projection.bias}
    if variant == "baseconv_short":
        out.update({"filter.weight": ref.conv.conv.weight, "filter.bias": ref.conv.conv.bias})
    elif variant == "baseconv_long":
        out.update({"filter.inner.weight": ref.conv.mlp[0].weight, "filter.inner.bias": ref.conv.mlp[0].bias,
                    "filter.outer.weight": ref.conv.mlp[2].weight, "filter.outer.bias": ref.conv.mlp[2].bias})
    else:
        out["filter.weight"] = ref.conv.filter
    return out


def _map_hyena(ref, ours, variant):
    d = ref.d_model
    perm = _perm_streams(d)
    f = ref.filter_fn.implicit_filter  # Linear, Sin, Linear, Sin, Linear, Sin, Linear (no bias)
    out = {"in_proj.weight": ref.in_proj.weight[perm], "in_proj.bias": ref.in_proj.bias[perm],
           "short_filter.weight": ref.short_filter.weight[perm], "short_filter.bias": ref.short_filter.bias[perm],
           "out_proj.weight": ref.out_proj.weight, "out_proj.bias": ref.out_proj.bias,
           "D": ref.filter_fn.bias, "filter.sin.freq": f[1].freq[0], "filter.out_weight": f[6].weight,
           "filter.z": ref.filter_fn.pos_emb.z[0]}
    for i, j in enumerate((0, 2, 4)):
        out[f"filter.inner.{i}.weight"], out[f"filter.inner.{i}.bias"] = f[j].weight, f[j].bias
    return out


def _map_h3(ref, ours, variant):
    qkv_w = torch.stack([ref.q_proj.weight, ref.k_proj.weight, ref.v_proj.weight], 1).flatten(0, 1)
    qkv_b = torch.stack([ref.q_proj.bias, ref.k_proj.bias, ref.v_proj.bias], 1).flatten()
    shift, diag = ref.ssm_k_kernel.kernel, ref.kernel.kernel
    return {"qkv.weight": qkv_w, "qkv.bias": qkv_b, "shift_C": shift.C[0], "shift_B": shift.B, "D_k": ref.ssm_k_D,
            "ssm.log_dt": diag.log_dt, "ssm.C": diag.C[0], "ssm.B": diag.B, "ssm.log_A_real": diag.inv_A_real,
            "ssm.A_imag": diag.A_imag, "D": ref.D, "out_proj.weight": ref.output_linear.weight,
            "out_proj.bias": ref.output_linear.bias}


def _map_rwkv(ref, ours, variant):
    return {"time_mix_k": ref.time_mix_k.flatten(), "time_mix_v": ref.time_mix_v.flatten(),
            "time_mix_r": ref.time_mix_r.flatten(), "time_decay": ref.time_decay, "time_first": ref.time_first,
            "key.weight": ref.key.weight, "value.weight": ref.value.weight,
            "receptance.weight": ref.receptance.weight, "output.weight": ref.output.weight}


def _map_long_conv(ref, ours, variant):
    m = ref.inner
    return {"filter.weight": m.kernel[0], "D": m.D[0], "out_proj.weight": m.output_linear[0].weight,
            "out_proj.bias": m.output_linear[0].bias}


MAPPINGS = {"baseconv_short": _map_baseconv, "baseconv_long": _map_baseconv, "baseconv_long_explicit": _map_baseconv,
            "hyena": _map_hyena, "h3": _map_h3, "rwkv": _map_rwkv, "long_conv": _map_long_conv}


def build_ours(variant: str, d: int, L: int):
    from neox_zoology import build_mixer

    name, kwargs, _, _ = OURS[variant]
    return build_mixer(name, hidden_size=d, seq_length=L, **kwargs)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    den = float(b.norm())
    return float((a - b).norm()) / den if den > 0 else float((a - b).norm())


def parity(refs: References, variant: str, d: int, L: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    ref = refs.build(variant, d, L).double()
    with torch.no_grad():
        for p in ref.parameters():
            if p.requires_grad:  # frozen features (BaseConv's z) stay as built, like ours
                p.add_(0.02 * torch.randn_like(p))
        if variant == "long_conv":
            ref.inner.kernel.copy_(0.01 * torch.randn_like(ref.inner.kernel))
    ours = build_ours(variant, d, L).double()
    inner = ours.mixer
    values = MAPPINGS[variant](ref, inner, variant)
    params = dict(inner.named_parameters())
    missing = sorted(set(params) - set(values))
    if missing:
        raise KeyError(f"{variant}: no reference value for {missing}")
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(value.detach().reshape(params[name].shape))
    x = torch.randn(2, L, d, dtype=torch.float64)
    g = torch.randn(2, L, d, dtype=torch.float64)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yo = ref(xr), ours(xo)
    (yr * g).sum().backward()
    (yo * g).sum().backward()
    # the mappings only index and reshape: applied to the reference's gradients, they give ours
    with torch.no_grad():
        for q in ref.parameters():
            q.data = q.grad.clone() if q.grad is not None else torch.zeros_like(q)
    ref_grads = MAPPINGS[variant](ref, inner, variant)
    per_param = {n: rel(params[n].grad.reshape(-1), ref_grads[n].reshape(-1)) for n in sorted(params)}
    return {"output_rel": rel(yo, yr), "input_grad_rel": rel(xo.grad, xr.grad),
            "param_grad_rel_max": max(per_param.values()), "param_grad_rel": per_param, "hidden": d,
            "seq_len": L, "dtype": "float64", "float32_limited": FLOAT32_LIMITED.get(variant)}


def init_statistic(refs: References | None, variant: str, d: int, L: int, seeds: int) -> dict:
    from neox_zoology import registry
    from neox_zoology.config import load
    from neox_zoology.mixers.single import SingleProcessMixer
    from neox_zoology.training.engine import model_config

    name, _, yml, layer_index = OURS[variant]
    args = load([ROOT / "configs" / "neox" / yml], sets=[f"hidden_size={d}", f"seq_length={L}",
                                                       "num_attention_heads=1", "bf16={enabled: false}"],
                world_size=1)
    spec = registry.get(name)
    ours_std, ref_std = [], []
    for seed in range(seeds):
        torch.manual_seed(seed)
        mixer = spec.module(model_config(args), layer_index + 1, seq_length=L,
                            **spec.per_layer(args.mixer_args(name), layer_index))
        ours_std.append(_output_std(SingleProcessMixer(mixer), variant, d, L, seed))
        if refs is not None:
            torch.manual_seed(seed)
            ref = refs.build(variant, d, L)
            refs.init_like_reference_model(ref, args.num_layers)
            ref_std.append(_output_std(ref, variant, d, L, seed))
    out = {"hidden": d, "seq_len": L, "num_layers": args.num_layers, "config": yml, "seeds": seeds,
           "ours_std": statistics.fmean(ours_std)}
    if ref_std:
        out["reference_std"] = statistics.fmean(ref_std)
        out["ratio"] = out["ours_std"] / out["reference_std"]
    return out


@torch.no_grad()
def _output_std(module, variant, d, L, seed) -> float:
    x = torch.randn(2, L, d, generator=torch.Generator().manual_seed(1000 + seed))
    y = module(x)
    return float((y - x if variant.startswith("baseconv") else y).std())


def time_pair(ours, ref, batch, d, L, rounds, steps) -> dict:
    """Per round: median wall and CPU (process) time of `steps` steps of each, in alternating order."""
    x = torch.randn(batch, L, d, requires_grad=True)

    def step(m):
        y = m(x)
        y.sum().backward()
        x.grad = None
        for p in m.parameters():
            p.grad = None

    def timed(m):
        step(m)  # warm-up
        wall, cpu = [], []
        for _ in range(steps):
            t0, c0 = time.perf_counter(), time.process_time()
            step(m)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        return statistics.median(wall), statistics.median(cpu), min(wall), min(cpu)

    rows = []
    for r in range(rounds):
        if r % 2 == 0:
            a, b = timed(ours), timed(ref)
        else:
            b, a = timed(ref), timed(ours)
        rows.append((a, b))
    wall = [a[0] / b[0] for a, b in rows]
    cpu = [a[1] / b[1] for a, b in rows]
    return {"ours_s": statistics.median(a[0] for a, _ in rows), "reference_s": statistics.median(b[0] for _, b in rows),
            "ours_cpu_s": statistics.median(a[1] for a, _ in rows),
            "reference_cpu_s": statistics.median(b[1] for _, b in rows),
            "ratio": statistics.median(wall), "ratio_per_round": wall,
            "cpu_ratio": statistics.median(cpu), "cpu_ratio_per_round": cpu,
            # fastest step of each over all rounds: the least disturbed by other work on a shared machine
            "min_ratio": min(a[2] for a, _ in rows) / min(b[2] for _, b in rows),
            "cpu_min_ratio": min(a[3] for a, _ in rows) / min(b[3] for _, b in rows),
            "batch": batch, "hidden": d, "seq_len": L, "dtype": "float32"}


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.reference", description=__doc__.splitlines()[0])
    p.add_argument("--zoology", default=os.environ.get("ZOOLOGY_REFERENCE"),
                   help="path of a HazyResearch/zoology checkout (env ZOOLOGY_REFERENCE)")
    p.add_argument("--safari", default=os.environ.get("SAFARI_REFERENCE"),
                   help="path of a HazyResearch/safari checkout (env SAFARI_REFERENCE)")
    p.add_argument("--mixers", default=",".join(VARIANTS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--parity-hidden", type=int, default=64)
    p.add_argument("--parity-len", type=int, default=256)
    p.add_argument("--init-hidden", type=int, nargs="+", default=[64, 1024])
    p.add_argument("--init-len", type=int, default=512)
    p.add_argument("--init-seeds", type=int, default=4, help="0: no init statistics")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--md", default=None)
    return p.parse_args(argv)


def targets(result: dict) -> list[dict]:
    out = []
    for variant, r in result["mixers"].items():
        par = r.get("parity")
        if par:
            value = max(par["output_rel"], par["input_grad_rel"], par["param_grad_rel_max"])
            out.append({"target": f"{variant}: float64 parity vs reference (max relative error)", "value": value,
                        "threshold": PARITY_TARGET, "met": value <= PARITY_TARGET,
                        "note": par.get("float32_limited")})
        for st in r.get("init", []):
            if "ratio" in st:
                out.append({"target": f"{variant}: init output std ours / reference, d {st['hidden']}",
                            "value": st["ratio"], "threshold": list(INIT_RANGE),
                            "met": INIT_RANGE[0] <= st["ratio"] <= INIT_RANGE[1]})
        sp = r.get("speed")
        if sp:
            out.append({"target": f"{variant}: fwd+bwd time ours / reference (B {sp['batch']}, d {sp['hidden']}, "
                                  f"L {sp['seq_len']}, fp32)", "value": sp["ratio"], "threshold": SPEED_TARGET,
                        "met": sp["ratio"] <= SPEED_TARGET})
    return out


def markdown(result: dict) -> str:
    if result.get("skipped"):
        return f"# Mixers vs the reference code\n\nSkipped: {result['skipped']}\n"
    lines = ["# Mixers vs the reference code", "",
             f"Generated by `python -m bench.reference` (zoology {result['reference']['zoology_commit'] or '?'}, "
             f"safari {result['reference']['safari_commit'] or '?'}). Parity: float64, d {result['config']['parity_hidden']}, "
             f"L {result['config']['parity_len']}; speed: B {result['config']['batch']}, d {result['config']['hidden']}, "
             f"L {result['config']['seq_len']}, fp32, {result['config']['threads']} thread(s), median of "
             f"{result['config']['rounds']} rounds.", "",
             "| mixer | output rel. err | input grad | worst param grad | init std ours / ref (d: ratio) | "
             "ours s | ref s | time ours / ref |", "|---|---:|---:|---:|---|---:|---:|---:|"]
    for variant, r in result["mixers"].items():
        if "skipped" in r:
            lines.append(f"| {variant} | skipped: {r['skipped']} | | | | | | |")
            continue
        par = r.get("parity") or {}
        init = "; ".join(f"{s['hidden']}: {s['ours_std']:.3g} / {s.get('reference_std', float('nan')):.3g} = "
                         f"{s.get('ratio', float('nan')):.2f}" for s in r.get("init", []))
        sp = r.get("speed") or {}

        def e(v):
            return "—" if v is None else f"{v:.1e}"

        lines.append(f"| {variant} | {e(par.get('output_rel'))} | {e(par.get('input_grad_rel'))} | "
                     f"{e(par.get('param_grad_rel_max'))} | {init or '—'} | {sp.get('ours_s', float('nan')):.3f} | "
                     f"{sp.get('reference_s', float('nan')):.3f} | {sp.get('ratio', float('nan')):.2f} |")
    notes = {v: r["parity"]["float32_limited"] for v, r in result["mixers"].items()
             if r.get("parity", {}).get("float32_limited")}
    if notes:
        lines += [""] + [f"- {v}: {why}" for v, why in notes.items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ns = parse(argv)
    t0 = time.perf_counter()
    torch.set_num_threads(ns.threads)
    result = {"benchmark": "reference", "loadavg_1min_at_start": loadavg()}
    if not ns.zoology or not Path(ns.zoology, "zoology").is_dir():
        result["skipped"] = ("no zoology checkout: pass --zoology PATH or set ZOOLOGY_REFERENCE "
                             "(git clone https://github.com/HazyResearch/zoology)")
        result["machine"] = machine(ns.threads)
        emit(result, ns.out, ns.md, markdown)
        return result
    refs = References(ns.zoology, ns.safari)
    result["reference"] = {"zoology": ns.zoology, "zoology_commit": checkout_commit(ns.zoology),
                           "safari": ns.safari, "safari_commit": checkout_commit(ns.safari),
                           "init_import_error": refs.errors.get("init")}
    result["config"] = {k: getattr(ns, k) for k in ("batch", "hidden", "seq_len", "rounds", "steps", "threads",
                                                    "parity_hidden", "parity_len", "init_hidden", "init_len",
                                                    "init_seeds")}
    result["mixers"] = {}
    for variant in [v for v in ns.mixers.split(",") if v]:
        entry: dict = {}
        result["mixers"][variant] = entry
        try:
            refs.build(variant, 8, 16)
        except Exception as e:  # noqa: BLE001 - a reference that cannot be built is reported, not fatal
            entry["skipped"] = f"reference not importable: {type(e).__name__}: {e}"
            log(f"{variant}: {entry['skipped']}")
            continue
        log(f"{variant}: parity")
        entry["parity"] = parity(refs, variant, ns.parity_hidden, ns.parity_len)
        if OURS[variant][2] and refs._init_weights is not None and ns.init_seeds > 0:
            log(f"{variant}: init statistics")
            entry["init"] = [init_statistic(refs, variant, d, ns.init_len, ns.init_seeds) for d in ns.init_hidden]
        if not ns.no_speed:
            log(f"{variant}: speed")
            torch.manual_seed(0)
            ours = build_ours(variant, ns.hidden, ns.seq_len)
            ref = refs.build(variant, ns.hidden, ns.seq_len)
            entry["speed"] = time_pair(ours, ref, ns.batch, ns.hidden, ns.seq_len, ns.rounds, ns.steps)
            log(f"{variant}: ratio {entry['speed']['ratio']:.2f}")
    result["targets"] = targets(result)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["machine"] = machine(ns.threads)
    emit(result, ns.out, ns.md, markdown)
    return result


if __name__ == "__main__":
    main()

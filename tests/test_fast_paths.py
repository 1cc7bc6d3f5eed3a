"""Optional fast paths, each compared with the portable path it replaces.

- `compile: true`: torch.compile of each block's mixer (CPU: inductor + the C++ compiler);
- fused norms: NVIDIA apex's FusedLayerNorm / FusedRMSNorm kernels on CUDA inputs;
- bf16: every mixer in bf16 against fp32, and the FFT convolution computing in fp32;
- flash attention through SDPA, FlashFFTConv, and flash-linear-attention's kernels (GLA, gated DeltaNet, Mamba-2's SSD).

What needs CUDA, apex, flashfftconv or fla is skipped without it (with the reason); everything that can
run on a CPU does, on the CPU.
"""
import copy
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

import neox_zoology
from dist import gather_tp_grad, init_tp, run_ranks
from neox_zoology import registry
from neox_zoology.config import build_args
from neox_zoology.mixers import fftconv
from neox_zoology.mixers.linear_attention import fla_path, kernels
from neox_zoology.mixers.mamba import mamba2
from neox_zoology.mixers.attention import CausalSelfAttention
from neox_zoology.model import block as block_module
from neox_zoology.model.block import LayerNorm, RMSNorm, ZooBlock, build_norm, compile_mixer
from neox_zoology.model.tconfig import transformer_config

CUDA = torch.cuda.is_available()
APEX = block_module.apex_fused_norm_functions() is not None
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: this fast path exists only there")
needs_apex = pytest.mark.skipif(
    not (CUDA and APEX), reason="needs a CUDA GPU and NVIDIA apex built with its fused_layer_norm_cuda extension")
needs_flashfftconv = pytest.mark.skipif(
    not (CUDA and fftconv.FlashFFTConv is not None), reason="needs a CUDA GPU and the flashfftconv package")
needs_fla = pytest.mark.skipif(
    not (CUDA and fla_path.available()), reason="needs a CUDA GPU and fla-core (pip install '.[cuda]')")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]

D, L, HEADS, B = 32, 16, 4, 2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in fp32."""
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def step(model, x, token_ids=None, seed=None):
    """One forward+backward with a fixed output gradient; (output, input grad, {param: grad})."""
    x = x.detach().clone().requires_grad_(True)
    if seed is not None:
        torch.manual_seed(seed)
    y = model(x, token_ids=token_ids)
    g = torch.Generator().manual_seed(123)
    (y.float() * torch.randn(y.shape, generator=g).to(y.device)).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), x.grad.detach(), grads


def assert_same_step(got, want, atol, rtol):
    torch.testing.assert_close(got[0], want[0], atol=atol, rtol=rtol)
    torch.testing.assert_close(got[1], want[1], atol=atol, rtol=rtol)
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], atol=atol, rtol=rtol, msg=name)


def is_compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def tiny_args(**overrides):
    raw = {"num_layers": 2, "hidden_size": D, "num_attention_heads": HEADS, "seq_length": L,
           "attention_config": [[["attention", "baseconv"], "all"]], "vocab_size": 64}
    raw.update(overrides)
    return build_args(raw, world_size=1)


# ----------------------------------------------------------------------------- torch.compile (CPU)


@pytest.mark.parametrize("name,kwargs", [
    ("attention", {}),
    ("baseconv", {"layer_index": 0}),  # short filter: the shift-and-add autograd function
    ("baseconv", {"layer_index": 1}),  # implicit long filter: the FFT-convolution autograd function
], ids=["attention", "baseconv_short", "baseconv_long"])
def test_compiled_mixer_equals_eager(name, kwargs):
    torch.manual_seed(0)
    eager = neox_zoology.build_mixer(name, hidden_size=D, seq_length=L, num_attention_heads=HEADS, **kwargs)
    if name == "attention":
        eager.mixer.dropout = 0.1  # compiled random ops draw like eager ones (fallback_random)
    compiled = copy.deepcopy(eager)
    assert compile_mixer(compiled.mixer) and is_compiled(compiled.mixer)
    x = torch.randn(B, L, D)
    assert_same_step(step(compiled, x, seed=7), step(eager, x, seed=7), atol=1e-5, rtol=1e-4)
    if name == "attention":  # the no-grad graph (checkpointing's first pass) draws the same masks too
        with torch.no_grad():
            torch.manual_seed(7)
            y = compiled(x)
        torch.testing.assert_close(y, step(eager, x, seed=7)[0], atol=1e-5, rtol=1e-4)


def test_compile_keeps_the_state_dict_and_honours_a_mixers_opt_out(monkeypatch):
    config = transformer_config(hidden_size=D, num_attention_heads=HEADS)
    plain = ZooBlock(tiny_args(), config, 1, "attention", 0)
    compiled = ZooBlock(tiny_args(compile=True), config, 1, "attention", 0)
    assert not plain.compiled and not is_compiled(plain.mixer)
    assert compiled.compiled and is_compiled(compiled.mixer)
    assert list(compiled.state_dict()) == list(plain.state_dict())  # checkpoints move between the two
    compiled.load_state_dict(plain.state_dict())

    monkeypatch.setattr(CausalSelfAttention, "supports_compile", False, raising=False)
    opted_out = ZooBlock(tiny_args(compile=True), config, 1, "attention", 0)
    assert not opted_out.compiled and not is_compiled(opted_out.mixer)


def _gpt_grads(rank, raw, tp):
    import torch._inductor.config

    from neox_zoology.model.gpt import SequentialGPT, lm_loss
    from neox_zoology.training.engine import model_config
    from neox_zoology.tokenizer import resolve_vocab

    # A forked child must not use the compile-worker pool the parent may have started (it hangs):
    # compile in this process.
    torch._inductor.config.compile_threads = 1
    init_tp(tp)
    args = build_args(raw, world_size=tp)
    resolve_vocab(args)
    model = SequentialGPT(args, model_config(args))
    blocks = [m for m in model.layers if isinstance(m, ZooBlock)]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (2, args.seq_length), generator=g)
    labels = torch.randint(0, args.vocab_size, (2, args.seq_length), generator=g)
    loss = lm_loss(model(tokens), (labels, torch.ones_like(labels)))
    loss.backward()
    return (float(loss), {n: gather_tp_grad(p) for n, p in model.named_parameters()},
            [b.compiled for b in blocks])


@pytest.mark.parametrize("tp", [1, 2])
def test_compiled_blocks_with_activation_checkpointing_match_eager_tp1(tp):
    """The training path: megatron-core parallel state set up, every block's mixer compiled and
    recomputed in backward (checkpoint_num_layers 1). At TP=2 megatron-core's TP layers and collectives
    run eagerly between compiled parts; the implicit long filter (a column-parallel linear) next to
    BaseConv's copy/gather is the case that came out wrong when they were traced."""
    raw = {"num_layers": 2, "hidden_size": D, "num_attention_heads": HEADS, "seq_length": L,
           "attention_config": [[["attention", "baseconv"], "all"]], "baseconv": {"kernel_sizes": [-1]},
           "vocab_size": 64, "norm": "rmsnorm", "activation": "swiglu", "pos_emb": "rotary",
           "intermediate_size": 3 * D}
    (loss1, g1, compiled1), = run_ranks(_gpt_grads, 1, raw, 1)
    assert compiled1 == [False, False]
    ranks = run_ranks(_gpt_grads, tp, {**raw, "compile": True, "checkpoint_activations": True,
                                       "checkpoint_num_layers": 1}, tp)
    for loss2, g2, compiled2 in ranks:
        assert compiled2 == [True, True]
        assert loss2 == pytest.approx(loss1, abs=1e-5)
        assert g2.keys() == g1.keys()
        for name in g1:
            torch.testing.assert_close(g2[name], g1[name], atol=1e-5, rtol=1e-4, msg=name)


@needs_cuda
@pytest.mark.parametrize("name", registry.names())
def test_every_compiled_mixer_equals_eager_on_cuda(name):
    torch.manual_seed(0)
    eager = neox_zoology.build_mixer(name, hidden_size=64, seq_length=128, num_attention_heads=4).cuda()
    compiled = copy.deepcopy(eager)
    if not getattr(type(compiled.mixer), "supports_compile", True):
        assert not compile_mixer(compiled.mixer) and not is_compiled(compiled.mixer)
        return
    assert compile_mixer(compiled.mixer)
    x = torch.randn(2, 128, 64, device="cuda")
    tokens = torch.randint(0, 8, (2, 128), device="cuda")
    assert_same_step(step(compiled, x, tokens, seed=3), step(eager, x, tokens, seed=3), atol=1e-4, rtol=1e-3)


# ----------------------------------------------------------------------------- fused norms


@pytest.mark.parametrize("norm,torch_cls", [("layernorm", torch.nn.LayerNorm), ("rmsnorm", torch.nn.RMSNorm)])
def test_norms_keep_torch_parameters_and_use_torch_on_cpu(norm, torch_cls, monkeypatch):
    args = tiny_args(norm=norm, fused_norms=True)

    def fused_kernels_must_not_run(x, *a, **k):
        raise AssertionError("the fused kernel ran on a CPU tensor")

    # apex "installed": the norm is built fused, and a CPU input still takes torch's path
    monkeypatch.setattr(block_module, "apex_fused_norm_functions",
                        lambda: (fused_kernels_must_not_run, fused_kernels_must_not_run))
    fused = build_norm(args)
    assert isinstance(fused, torch_cls) and fused.fused
    reference = torch_cls(D, eps=fused.eps)
    assert list(fused.state_dict()) == list(reference.state_dict())
    with torch.no_grad():
        fused.weight.uniform_(0.5, 1.5)
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(3, 5, D)
    torch.testing.assert_close(fused(x), reference(x), atol=0, rtol=0)

    # no apex, or fused_norms off: the plain module
    monkeypatch.setattr(block_module, "apex_fused_norm_functions", lambda: None)
    assert not build_norm(args).fused
    monkeypatch.setattr(block_module, "apex_fused_norm_functions", lambda: (None, None))
    assert not build_norm(tiny_args(norm=norm, fused_norms=False)).fused
    plain = build_norm(tiny_args(norm=norm, fused_norms=False))
    plain.load_state_dict(fused.state_dict())  # checkpoints move between fused and unfused


def test_without_apex_norms_are_portable_here():
    if APEX:
        pytest.skip("apex with its CUDA extension is installed here")
    assert not build_norm(tiny_args(norm="layernorm", fused_norms=True)).fused
    assert not build_norm(tiny_args(norm="rmsnorm", fused_norms=True)).fused


@needs_apex
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_fused_norms_equal_torch_norms_on_cuda(norm, dtype):
    from apex.normalization import FusedLayerNorm, FusedRMSNorm

    args = tiny_args(norm=norm, fused_norms=True, hidden_size=256, num_attention_heads=4)
    fused = build_norm(args).cuda().to(dtype)
    plain = build_norm(tiny_args(norm=norm, fused_norms=False, hidden_size=256, num_attention_heads=4)).cuda().to(dtype)
    assert fused.fused and not plain.fused
    apex_module = (FusedLayerNorm if norm == "layernorm" else FusedRMSNorm)(256, eps=fused.eps)
    assert list(apex_module.state_dict()) == list(fused.state_dict())
    with torch.no_grad():
        fused.weight.uniform_(0.5, 1.5)
        if norm == "layernorm":
            fused.bias.uniform_(-0.5, 0.5)
    plain.load_state_dict(fused.state_dict())
    apex_module.load_state_dict(fused.state_dict())
    x = torch.randn(64, 4, 256, device="cuda", dtype=dtype)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    outs = []
    for module in (fused, plain, apex_module.cuda().to(dtype)):
        xx = x.clone().requires_grad_(True)
        y = module(xx)
        y.float().square().sum().backward()
        outs.append((y.detach(), xx.grad, module.weight.grad))
    for got in (outs[0], outs[2]):
        for a, b in zip(got, outs[1]):
            torch.testing.assert_close(a, b, **tol)


# ----------------------------------------------------------------------------- bf16


MIXER_CASES = [(name, {}) for name in registry.names()] + [("baseconv", {"layer_index": 1})]
MIXER_IDS = [name + ("_long" if kw else "") for name, kw in MIXER_CASES]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,kwargs", MIXER_CASES, ids=MIXER_IDS)
def test_bf16_mixer_matches_fp32(device, name, kwargs):
    """The whole mixer in bf16 (as DeepSpeed's bf16 mode casts the module) against fp32 on the same
    weights (rounded to bf16 first, so only the arithmetic differs): output, input gradient and the
    parameter gradients within a bf16 tolerance."""
    torch.manual_seed(0)
    n = 64
    fp32 = neox_zoology.build_mixer(name, hidden_size=n, seq_length=n, num_attention_heads=4, **kwargs).to(device)
    with torch.no_grad():
        for t in [*fp32.parameters(), *fp32.buffers()]:
            if t.is_floating_point():
                t.copy_(t.bfloat16().float())
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    x = torch.randn(2, n, n, device=device)
    tokens = torch.randint(0, 8, (2, n), device=device)
    want = step(fp32, x, tokens, seed=1)
    got = step(bf16, x.bfloat16(), tokens, seed=1)
    assert got[0].dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in got[2].values())
    assert rel_err(got[0], want[0]) < 3e-2
    assert rel_err(got[1], want[1]) < 3e-2
    names = sorted(want[2])
    assert rel_err(torch.cat([got[2][k].flatten().float() for k in names]),
                   torch.cat([want[2][k].flatten() for k in names])) < 3e-2


class FFTDtypes(TorchDispatchMode):
    """Records the input dtypes of every FFT op that runs."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name.startswith("_fft_"):
            self.seen.append((name, args[0].dtype))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", DEVICES)
def test_fft_conv_computes_in_fp32_for_bf16_inputs(device, monkeypatch):
    monkeypatch.setattr(fftconv, "FlashFFTConv", None)  # the torch FFT path (FlashFFTConv: its own test)
    torch.manual_seed(0)
    u = torch.randn(2, 8, 64, device=device).bfloat16().requires_grad_(True)
    k = (torch.randn(8, 64, device=device) / 8).bfloat16().requires_grad_(True)
    with FFTDtypes() as mode:
        y = fftconv.fft_causal_conv(u, k)
        y.float().square().sum().backward()
    ops = {name for name, _ in mode.seen}
    assert {"_fft_r2c", "_fft_c2r"} <= ops
    assert {dtype for _, dtype in mode.seen} <= {torch.float32, torch.complex64}, mode.seen
    assert y.dtype == u.grad.dtype == k.grad.dtype == torch.bfloat16
    u32, k32 = u.detach().float().requires_grad_(True), k.detach().float().requires_grad_(True)
    y32 = fftconv.fft_causal_conv(u32, k32)
    y32.square().sum().backward()
    assert rel_err(y, y32) < 1e-2 and rel_err(u.grad, u32.grad) < 2e-2 and rel_err(k.grad, k32.grad) < 2e-2


# ----------------------------------------------------------------------------- flash attention (SDPA)


@pytest.mark.parametrize("device,dtype,name", [
    ("cpu", torch.float32, "attention"),
    ("cpu", torch.bfloat16, "attention"),
    ("cpu", torch.float32, "sliding_window"),  # CPU's flash kernel takes the window mask
    # On CUDA the flash kernel takes no explicit mask: sliding_window uses another SDPA backend there.
    pytest.param("cuda", torch.bfloat16, "attention", marks=needs_cuda),
    pytest.param("cuda", torch.float16, "attention", marks=needs_cuda),
])
def test_attention_with_the_flash_backend_equals_the_math_backend(device, dtype, name):
    torch.manual_seed(0)
    n = 128 if device == "cuda" else 32
    kwargs = {"window": 8} if name == "sliding_window" else {}
    mixer = neox_zoology.build_mixer(name, hidden_size=n, seq_length=n, num_attention_heads=2, **kwargs)
    mixer = mixer.to(device=device, dtype=dtype)
    x = torch.randn(2, n, n, device=device, dtype=dtype)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        flash = step(mixer, x)
    for p in mixer.parameters():
        p.grad = None
    with sdpa_kernel(SDPBackend.MATH):
        math_ = step(mixer, x)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(flash[0], math_[0]) < tol
    assert rel_err(flash[1], math_[1]) < tol
    for key in math_[2]:
        assert rel_err(flash[2][key], math_[2][key]) < tol, key


# ----------------------------------------------------------------------------- FlashFFTConv


def test_flash_fft_size_follows_flashfftconv_input_requirements():
    bf16, fp16 = torch.bfloat16, torch.float16
    assert fftconv.flash_fft_size(16, 64, bf16) == 256  # the smallest FFT size it has
    assert fftconv.flash_fft_size(128, 64, fp16) == 256
    assert fftconv.flash_fft_size(132, 64, bf16) == 512
    assert fftconv.flash_fft_size(2048, 64, bf16) == 4096
    assert fftconv.flash_fft_size(2048, 64, torch.float32) is None  # fp32 keeps the fp32 torch FFT
    assert fftconv.flash_fft_size(101, 64, bf16) is None  # L must be even
    assert fftconv.flash_fft_size(130, 64, bf16) is None  # FFT size 512: L must divide by 4
    assert fftconv.flash_fft_size(1000, 64, bf16) == 2048
    assert fftconv.flash_fft_size(1002, 64, bf16) is None  # FFT size 2048: L must divide by 4
    assert fftconv.flash_fft_size(32768, 64, bf16) == 65536
    assert fftconv.flash_fft_size(32768, 72, bf16) is None  # above 32K: channels divide by 16
    assert fftconv.flash_fft_size(1 << 21, 64, bf16) == 1 << 22
    assert fftconv.flash_fft_size((1 << 21) + 2, 64, bf16) is None  # above 4M
    for L in range(2, 600, 2):
        size = fftconv.flash_fft_size(L, 64, bf16)
        if size is not None:
            assert size >= 2 * L and size & (size - 1) == 0


@needs_flashfftconv
@pytest.mark.parametrize("L,Lk", [(16, 16), (100, 100), (1000, 7), (2048, 2048)])
def test_flashfftconv_equals_the_torch_fft_path(L, Lk, monkeypatch):
    calls = []
    flash = fftconv._flash
    monkeypatch.setattr(fftconv, "_flash", lambda u, k, size: calls.append(size) or flash(u, k, size))
    torch.manual_seed(0)
    u = torch.randn(2, 64, L, device="cuda").bfloat16()
    k = (torch.randn(64, Lk, device="cuda") / math.sqrt(Lk))
    outs = []
    for fn in (fftconv.fft_causal_conv, fftconv._FFTConv.apply):
        uu, kk = u.clone().requires_grad_(True), k.clone().requires_grad_(True)
        y = fn(uu, kk)
        y.float().square().sum().backward()
        outs.append((y, uu.grad, kk.grad))
    assert calls == [fftconv.flash_fft_size(L, 64, torch.bfloat16)]
    for got, want in zip(*outs):  # FlashFFTConv's FFTs are bf16 matmuls: a bf16 tolerance
        assert got.dtype == want.dtype
        assert rel_err(got, want) < 3e-2


def _linear_attention_inputs(kind, device, dtype, b=2, h=2, L=100, K=32, V=48):
    """q, k, v [b, h, L, *] and the decay of `kind`: none | head | channel (log decays <= 0), or the delta
    rule's (beta, log_alpha) with L2-normalised q, k."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, L, n, generator=g) for n in (K, K, V))
    if kind == "delta":
        q, k = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
        extra = (torch.rand(b, h, L, generator=g), -torch.rand(b, h, L, generator=g) * 0.5)
    else:
        shape = {"none": None, "head": (b, h, L), "channel": (b, h, L, K)}[kind]
        q = q * K ** -0.5
        extra = (None if shape is None else -torch.rand(*shape, generator=g) * 0.5,)
    return [None if t is None else t.to(device, dtype).requires_grad_(True) for t in (q, k, v, *extra)]


def _run_kernel(kind, inputs):
    fn = kernels.chunked_gated_delta_rule if kind == "delta" else kernels.chunked_linear_attention
    o, S = fn(*inputs, chunk_size=64) if kind == "delta" else fn(*inputs, chunk_size=16)
    (o.float().square().sum() + S.float().sum()).backward()
    return [o, S] + [t.grad for t in inputs if t is not None]


def test_the_fla_path_is_only_taken_for_cuda_inputs_it_supports(monkeypatch):
    """Whatever is installed, CPU and fp64 inputs, heads wider than the kernels tile and an initial state that
    needs a gradient run the portable kernels; `ENABLED = False` turns the fast path off."""
    monkeypatch.setattr(fla_path, "_fla_gla", object())  # as if fla had imported
    cpu = torch.zeros(1, 2, 8, 16)
    assert not fla_path.usable(cpu, cpu, None)

    class FakeCuda:
        is_cuda, dtype = True, torch.float32

        def __init__(self, last):
            self.shape = (1, 2, 8, last)

    assert fla_path.usable(FakeCuda(64), FakeCuda(64), None)
    assert not fla_path.usable(FakeCuda(fla_path.MAX_HEAD_DIM + 1), FakeCuda(64), None)
    fp64 = FakeCuda(64)
    fp64.dtype = torch.float64
    assert not fla_path.usable(fp64, FakeCuda(64), None)
    assert not fla_path.usable(FakeCuda(64), FakeCuda(64), torch.zeros(1, requires_grad=True))
    monkeypatch.setattr(fla_path, "ENABLED", False)
    assert not fla_path.usable(FakeCuda(64), FakeCuda(64), None)


@needs_fla
@pytest.mark.parametrize("kind", ["none", "head", "channel", "delta"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fla_kernels_equal_the_portable_kernels(kind, dtype, monkeypatch):
    """Outputs, final states and every input gradient of the fla path against the portable kernels in fp32
    (fla's dot products use tf32 / bf16 tensor cores: a 1e-2 / 5e-2 relative tolerance)."""
    calls = []
    for name in ("linear_attention", "gated_delta_rule"):
        fn = getattr(fla_path, name)
        monkeypatch.setattr(fla_path, name, lambda *a, fn=fn, **k: calls.append(fn) or fn(*a, **k))
    fast = _run_kernel(kind, _linear_attention_inputs(kind, "cuda", dtype))
    assert len(calls) == 1
    monkeypatch.setattr(fla_path, "ENABLED", False)
    ref = _run_kernel(kind, _linear_attention_inputs(kind, "cuda", torch.float32))
    assert len(calls) == 1
    tol = 1e-2 if dtype == torch.float32 else 5e-2
    for name, got, want in zip(["o", "S", "dq", "dk", "dv", "d_extra1", "d_extra2"], fast, ref):
        assert got.shape == want.shape and rel_err(got.float(), want.float()) < tol, name


def _ssd_inputs(device, dtype, b=2, H=4, G=2, L=80, P=24, N=32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, H, L, P, generator=g)
    dt = torch.rand(b, H, L, generator=g) * 0.2 + 0.01
    A = -torch.rand(H, generator=g) * 4 - 0.5
    B, C = (torch.randn(b, G, L, N, generator=g) * N ** -0.5 for _ in range(2))
    return [t.to(device, dtype).requires_grad_(True) for t in (x, dt, A, B, C)]


def test_the_ssd_fla_wrapper_is_linear_attention_with_one_gate_per_head(monkeypatch):
    """Mamba-2's SSD through a stand-in with chunk_simple_gla's signature computed by the portable linear-attention
    kernel: groups expanded to heads, v = dt x, gate dt A, the state transposed both ways; equal to the portable
    `chunked_ssd` on the CPU, initial state included."""
    def fake_simple_gla(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False):
        assert scale == 1.0 and output_final_state and g.shape == q.shape[:3] == k.shape[:3] == v.shape[:3]
        t = [a.transpose(1, 2) for a in (q, k, v, g)]
        o, S = kernels.chunked_linear_attention(*t, chunk_size=16, initial_state=initial_state)
        return o.transpose(1, 2), S

    monkeypatch.setattr(fla_path, "_fla_simple_gla", fake_simple_gla)
    x, dt, A, B, C = (t.detach() for t in _ssd_inputs("cpu", torch.float32))  # fla's states are fp32
    h0 = torch.randn(2, 4, 24, 32)
    got = fla_path.ssd(x, dt, A, B, C, h0)
    want = mamba2.chunked_ssd(x, dt, A, B, C, chunk_size=32, initial_state=h0)
    for a, b in zip(got, want):
        assert a.shape == b.shape and rel_err(a, b) < 1e-5


@needs_fla
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fla_ssd_equals_the_portable_ssd(dtype, monkeypatch):
    """Mamba-2's chunked SSD on CUDA through fla against the portable form in fp32: outputs, final state, gradients."""
    calls = []
    fn = fla_path.ssd
    monkeypatch.setattr(fla_path, "ssd", lambda *a, **k: calls.append(1) or fn(*a, **k))

    def run(inputs):
        y, h = mamba2.chunked_ssd(*inputs, chunk_size=32)
        (y.float().square().sum() + h.float().sum()).backward()
        return [y, h] + [t.grad for t in inputs]

    fast = run(_ssd_inputs("cuda", dtype))
    assert calls == [1]
    monkeypatch.setattr(fla_path, "ENABLED", False)
    ref = run(_ssd_inputs("cuda", torch.float32))
    assert calls == [1]
    tol = 1e-2 if dtype == torch.float32 else 5e-2
    for name, got, want in zip(["y", "h", "dx", "ddt", "dA", "dB", "dC"], fast, ref):
        assert got.shape == want.shape and rel_err(got.float(), want.float()) < tol, name


@needs_fla
@pytest.mark.parametrize("name", ["gla", "gated_deltanet", "mamba2"])
def test_fla_mixers_equal_their_portable_path(name, monkeypatch):
    torch.manual_seed(0)
    m = neox_zoology.build_mixer(name, hidden_size=128, seq_length=96, layer_index=0).cuda()
    x = torch.randn(2, 96, 128, device="cuda")
    outs = []
    for enabled in (True, False):
        monkeypatch.setattr(fla_path, "ENABLED", enabled)
        m.zero_grad()
        xx = x.clone().requires_grad_(True)
        y = m(xx)
        y.square().sum().backward()
        outs.append([y, xx.grad] + [p.grad for p in m.parameters()])
    for got, want in zip(*outs):
        assert rel_err(got, want) < 1e-2


@pytest.mark.parametrize("kind", ["none", "head", "channel", "delta"])
def test_the_fla_wrappers_pass_fla_its_layout(kind, monkeypatch):
    """Stand-ins with fla's documented signatures ([B, T, H, K] inputs, gates [B, T, H(, K)], scale, fp32 initial
    state, final state [B, H, K, V]) computed by the portable kernels: the wrappers move the layout both ways
    and equal the portable path on the CPU (the CUDA test compares the real kernels)."""
    def to_bhlk(*xs):
        return [None if x is None else x.transpose(1, 2) for x in xs]

    def fake_linear(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False):
        assert scale == 1.0 and output_final_state and q.shape[:3] == v.shape[:3]
        assert g is None or g.shape[:3] == q.shape[:3]
        o, S = kernels.chunked_linear_attention(*to_bhlk(q, k, v, g), chunk_size=16, initial_state=initial_state)
        return o.transpose(1, 2), S

    def fake_delta(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, chunk_size=64):
        assert scale == 1.0 and output_final_state and chunk_size in fla_path.DELTA_RULE_CHUNKS
        assert g.shape == beta.shape == q.shape[:3]
        o, S = kernels.chunked_gated_delta_rule(*to_bhlk(q, k, v, beta, g), chunk_size=chunk_size,
                                                initial_state=initial_state)
        return o.transpose(1, 2), S

    monkeypatch.setattr(fla_path, "_fla_gla", fake_linear)
    monkeypatch.setattr(fla_path, "_fla_simple_gla", fake_linear)
    monkeypatch.setattr(fla_path, "_fla_gated_delta_rule", fake_delta)
    inputs = _linear_attention_inputs(kind, "cpu", torch.float32)
    args = [t.detach() for t in inputs if t is not None]
    if kind != "delta" and len(args) == 3:
        args.append(None)
    S0 = torch.randn(2, 2, 32, 48)
    wrapped = (fla_path.gated_delta_rule(*args, 64, S0) if kind == "delta"
               else fla_path.linear_attention(*args, initial_state=S0))
    fn = kernels.chunked_gated_delta_rule if kind == "delta" else kernels.chunked_linear_attention
    direct = fn(*args, chunk_size=64 if kind == "delta" else 16, initial_state=S0)
    for got, want in zip(wrapped, direct):
        assert got.shape == want.shape and rel_err(got, want) < 1e-6

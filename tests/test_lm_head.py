"""The chunked LM head + cross-entropy (`lm_head_chunk_tokens`): the same loss, per-token NLL and gradients
as the whole-logits path, under TP and the pipeline engine, with far less memory."""
import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dist import init_tp, model_grads, run_ranks
from neox_zoology.config import ConfigError, build_args
from neox_zoology.model.gpt import lm_loss, token_nll
from neox_zoology.model.lm_head import HeadInput, head_input
from test_ar_hook import bigram_file  # noqa: F401 - the fixture, shared with the AR-slice hook's own tests

S, B, H, V = 13, 3, 16, 40  # 39 tokens


def reference_nll(x, w, labels):
    """Plain cross-entropy per token [b, s] from the whole logits [b, s, V] (x [s, b, h], w [V, h])."""
    logits = (x @ w.t()).transpose(0, 1)  # [b, s, V]
    logp = logits - logits.logsumexp(-1, keepdim=True)
    return -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def reference_loss(x, w, labels, mask):
    nll = reference_nll(x, w, labels)
    return (nll * mask).sum() / mask.sum()


def problem(dtype, seed=0, s=S, b=B, h=H, v=V):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(s, b, h, generator=g, dtype=dtype)
    w = torch.randn(v, h, generator=g, dtype=dtype) / h ** 0.5
    labels = torch.randint(0, v, (b, s), generator=g)
    mask = (torch.rand(b, s, generator=g) > 0.3).to(dtype)
    mask[:, :4] = 0  # in [s, b] token order the first 12 tokens are masked: whole chunks without gradient
    return x, w, labels, mask


def loss_and_grads(loss_fn, x, w, labels, mask):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = loss_fn(x, w, labels, mask)
    loss.backward()
    return loss.detach(), x.grad, w.grad


CHUNKS = [1, 4, 7, 13, 39, 64]  # 7 and 4 do not divide the 39 tokens; 64 is more than all of them


@pytest.mark.parametrize("chunk", CHUNKS)
def test_loss_and_gradients_equal_the_whole_logits_in_float64(chunk):
    x, w, labels, mask = problem(torch.float64)
    ref = loss_and_grads(reference_loss, x, w, labels, mask)
    out = loss_and_grads(lambda x, w, y, m: lm_loss(head_input(x, w, chunk), (y, m)), x, w, labels, mask)
    for name, a, b in zip(("loss", "d hidden", "d weight"), out, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13, msg=name)


@pytest.mark.parametrize("chunk", [4, 7, 39])
def test_loss_and_gradients_equal_the_unchunked_head_in_float32(chunk):
    x, w, labels, mask = problem(torch.float32, seed=1)
    ref = loss_and_grads(lambda x, w, y, m: lm_loss(F.linear(x, w).transpose(0, 1), (y, m)), x, w, labels, mask)
    out = loss_and_grads(lambda x, w, y, m: lm_loss(head_input(x, w, chunk), (y, m)), x, w, labels, mask)
    for name, a, b in zip(("loss", "d hidden", "d weight"), out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_weights_and_hidden_states_train_as_accurately_as_the_unchunked_head():
    x, w, labels, mask = problem(torch.float32, seed=5, s=64, b=2, h=32, v=300)
    ref = loss_and_grads(reference_loss, x.double(), w.double(), labels, mask.double())
    whole = loss_and_grads(lambda x, w, y, m: lm_loss(F.linear(x, w).transpose(0, 1).contiguous(), (y, m)),
                           x.bfloat16(), w.bfloat16(), labels, mask)
    chunked = loss_and_grads(lambda x, w, y, m: lm_loss(head_input(x, w, 10), (y, m)),
                             x.bfloat16(), w.bfloat16(), labels, mask)
    assert chunked[1].dtype == chunked[2].dtype == torch.bfloat16
    for name, got, base, exact in zip(("loss", "d hidden", "d weight"), chunked, whole, ref):
        err = float((got.double() - exact).norm() / exact.norm())
        base_err = float((base.double() - exact).norm() / exact.norm())
        assert err <= max(2 * base_err, 1e-4), name  # bf16 rounding, no worse than the whole-logits head


def test_masked_tokens_get_no_gradient():
    x, w, labels, mask = problem(torch.float64)
    _, dx, _ = loss_and_grads(lambda x, w, y, m: lm_loss(head_input(x, w, 5), (y, m)), x, w, labels, mask)
    assert torch.equal(dx.transpose(0, 1)[mask == 0], torch.zeros_like(dx.transpose(0, 1)[mask == 0]))
    assert dx.transpose(0, 1)[mask == 1].abs().sum() > 0


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_per_token_nll_equals_cross_entropy(chunk):
    x, w, labels, _ = problem(torch.float64, seed=2)
    with torch.no_grad():  # what the AR-slice evaluation does
        nll = token_nll(head_input(x, w, chunk), labels)
    assert nll.shape == labels.shape and nll.is_contiguous()
    torch.testing.assert_close(nll, reference_nll(x, w, labels), rtol=1e-12, atol=1e-13)
    # and with gradients: a per-token weighting backpropagates through the chunks too
    weights = torch.rand(labels.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got = loss_and_grads(lambda x, w, y, m: (token_nll(head_input(x, w, chunk), y) * m).sum(), x, w, labels, weights)
    ref = loss_and_grads(lambda x, w, y, m: (reference_nll(x, w, y) * m).sum(), x, w, labels, weights)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_head_input_can_still_give_the_whole_logits():
    x, w, labels, _ = problem(torch.float64)
    torch.testing.assert_close(head_input(x, w, 8).logits(), (x @ w.t()).transpose(0, 1))


def test_engine_hooks_on_the_returned_tensors_run_before_the_head_weight_gradient_and_scale_it():
    """DeepSpeed hooks the tensors a model returns (its backward set-up; 1/accumulation-steps scaling of
    torch-style backward). Those hooks must see the loss gradient before any parameter gradient lands."""
    x, w, labels, mask = problem(torch.float32)
    weight = torch.nn.Parameter(w.clone())
    hidden = x.clone().requires_grad_()
    head = head_input(hidden * 1.0, weight, 7)
    events = []

    def hook(name):
        def fn(grad):
            events.append(name)
            return grad * 0.5

        return fn

    for t in head:
        if isinstance(t, torch.Tensor) and t.grad_fn is not None:
            t.register_hook(hook("output"))
    weight.register_post_accumulate_grad_hook(lambda p: events.append("weight accumulated"))
    lm_loss(head, (labels, mask)).backward()
    assert events.count("output") == 2 and events.count("weight accumulated") == 1
    assert events[0] == "output"  # the engine's once-per-backward set-up runs before any parameter gradient
    _, dx, dw = loss_and_grads(reference_loss, x.double(), w.double(), labels, mask.double())
    torch.testing.assert_close(weight.grad.double(), 0.5 * dw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden.grad.double(), 0.5 * dx, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- memory


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created while the mode is on and still alive (checked after each op).

    A storage counts from the op that returns it (unless it is one of the op's inputs' storages: views and
    in-place results) until its last reference dies. Weights and inputs made before the mode do not count."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.now -= self.live.pop(key)[1]
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if st.nbytes() and key not in inputs and key not in self.live:
                self.live[key] = (StorageWeakRef(st), st.nbytes())
                self.now += st.nbytes()
        self.peak = max(self.peak, self.now)
        return out


def peak_bytes(make_output, x, w, labels, mask):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    with LiveBytes() as meter:
        loss = lm_loss(make_output(x, w), (labels, mask))
        loss.backward()
        del loss
    assert x.grad is not None and w.grad is not None
    return meter.peak


def test_peak_memory_of_forward_and_backward_is_a_fraction_of_the_whole_logits():
    s, b, h, v, chunk = 128, 4, 32, 4096, 32
    x, w, labels, mask = problem(torch.float32, s=s, b=b, h=h, v=v)
    logits_bytes = s * b * v * 4
    whole = peak_bytes(lambda x, w: F.linear(x, w).transpose(0, 1).contiguous(), x, w, labels, mask)
    chunked = peak_bytes(lambda x, w: head_input(x, w, chunk), x, w, labels, mask)
    assert whole >= 2 * logits_bytes  # logits, their log-softmax, their gradient: several copies at once
    # weight gradient (fp32, 0.5 MB), hidden gradient, one chunk's logits (0.5 MB) and per-token floats
    assert chunked < logits_bytes / 4
    assert chunked < whole / 10


def test_the_meter_sees_a_known_allocation():
    with LiveBytes() as meter:
        a = torch.ones(1000)
        b = a * 2
        del a
        c = b.view(10, 100) + 1  # noqa: F841 - a view does not count, the sum does
    assert meter.peak == 8000  # a + b, then b + c


# ----------------------------------------------------------------------------- tensor parallel


def _tp_function(rank, tp, chunk, x, w, labels, mask):
    from neox_zoology.parallel import copy_to_tp, tp_rank

    init_tp(tp)
    part = w.shape[0] // tp
    shard = w[tp_rank() * part:(tp_rank() + 1) * part].clone().requires_grad_()
    hidden = x.clone().requires_grad_()

    def head():
        if chunk:
            return head_input(hidden, shard, chunk)
        return F.linear(copy_to_tp(hidden), shard).transpose(0, 1).contiguous()  # as the unchunked heads do

    loss = lm_loss(head(), (labels, mask))
    loss.backward()
    with torch.no_grad():
        nll = token_nll(head(), labels)
    parts = [torch.empty_like(shard.grad) for _ in range(tp)]
    torch.distributed.all_gather(parts, shard.grad)
    return loss.detach(), nll, hidden.grad, torch.cat(parts)


@pytest.mark.parametrize("chunk", [5, 39])
def test_tp2_equals_tp1_and_megatron_vocab_parallel_cross_entropy(chunk):
    x, w, labels, mask = problem(torch.float32, seed=4)
    ref = loss_and_grads(reference_loss, x.double(), w.double(), labels, mask.double())
    ref_nll = reference_nll(x.double(), w.double(), labels)
    (tp1,) = run_ranks(_tp_function, 1, 1, chunk, x, w, labels, mask)
    tp2 = run_ranks(_tp_function, 2, 2, chunk, x, w, labels, mask)
    megatron = run_ranks(_tp_function, 2, 2, 0, x, w, labels, mask)  # whole logits, vocab_parallel_cross_entropy
    assert len(tp2) == 2
    for loss, nll, dx, dw in [tp1, *tp2, *megatron]:
        torch.testing.assert_close(loss.double(), ref[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(nll.double(), ref_nll, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx.double(), ref[1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dw.double(), ref[2], rtol=1e-5, atol=1e-6)
    for a, b in zip(tp2[0], megatron[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_model_with_chunked_head_under_tp2_equals_unchunked_tp1(tiny_raw, tied):
    raw = tiny_raw(vocab_size=512, no_weight_tying=not tied, hidden_dropout=0.0)
    (loss1, g1, out1), = run_ranks(model_grads, 1, raw, 1, True)
    chunked = {**raw, "lm_head_chunk_tokens": 24}
    (loss_c, g_c, out_c), = run_ranks(model_grads, 1, chunked, 1, True)
    tp2 = run_ranks(model_grads, 2, chunked, 2, True)
    assert out1 == "Tensor" and out_c == HeadInput.__name__  # whole logits vs the chunked head's input
    for loss, grads, _ in [(loss_c, g_c, out_c), *tp2]:
        assert loss == pytest.approx(loss1, abs=1e-6)
        assert grads.keys() == g1.keys()
        for name in g1:
            torch.testing.assert_close(grads[name], g1[name], atol=1e-6, rtol=1e-5, msg=name)


# ----------------------------------------------------------------------------- engines


def _train(rank, raw, world):
    from neox_zoology.training.loop import run

    return run(build_args(raw, world_size=world))


def losses(raw, world):
    return [[loss for _, loss in s["losses"]] for s in run_ranks(_train, world, raw, world)]


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_plain_engine_with_accumulation_trains_identically(tiny_raw, tied):
    raw = tiny_raw(pipe_parallel_size=0, gradient_accumulation_steps=2, train_iters=3, no_weight_tying=not tied)
    (plain,) = losses(raw, 1)
    (chunked,) = losses({**raw, "lm_head_chunk_tokens": 20}, 1)
    assert chunked == pytest.approx(plain, abs=1e-5)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_pipeline_pp2_with_chunked_head_trains_like_the_unchunked_pipeline(tiny_raw, tied):
    raw = tiny_raw(pipe_parallel_size=2, train_iters=3, no_weight_tying=not tied)
    plain = losses(raw, 2)
    chunked = losses({**raw, "lm_head_chunk_tokens": 20, "checkpoint_activations": True}, 2)
    for stage in chunked:
        assert stage == pytest.approx(plain[0], abs=1e-5)


def test_ar_slice_hook_uses_the_chunked_path_under_both_engines(tiny_raw, bigram_file, tmp_path):
    from test_ar_hook import _hook_after_save, hook_raw, same_slices

    raw = hook_raw(tiny_raw, bigram_file, tmp_path / "ref")
    ref, vloss, _ = run_ranks(_hook_after_save, 1, raw, 1)[0]
    for pipe, world in [(0, 1), (2, 2)]:
        chunked = hook_raw(tiny_raw, bigram_file, tmp_path / f"pipe{pipe}", pipe_parallel_size=pipe,
                           lm_head_chunk_tokens=24)
        for doc, closs, _ in run_ranks(_hook_after_save, world, chunked, world):
            same_slices(doc, ref)
            assert closs == pytest.approx(vloss, abs=1e-5)


def test_negative_chunk_size_is_a_config_error(tiny_raw):
    with pytest.raises(ConfigError, match="lm_head_chunk_tokens"):
        build_args(tiny_raw(lm_head_chunk_tokens=-1), world_size=1)


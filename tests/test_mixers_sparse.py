"""sparse_random / sparse_programmatic / sparse_learned: selection rules, equality with dense masked
attention, causality, the auxiliary loss, TP=2 == TP=1, PP=2 == PP=1, gradient accumulation and data
parallel scaling, validation, and the paper-scale hybrid configs."""
import math

import pytest
import torch
import torch.nn.functional as F

import neox_zoology
from conftest import ROOT
from dist import PAPER_RUN_KEYS_OFF, gather_tp_grad, init_tp, run_ranks
from properties import assert_causal
from neox_zoology import registry
from neox_zoology.config import ConfigError, build_args, load
from neox_zoology.mixers import sparse
from neox_zoology.mixers.sparse import collect_stats, programmatic_selection, selected_positions, set_aux_loss_scale
from neox_zoology.mixers.sparse import kernel
from neox_zoology.mixers.sparse.kernel import SelectedQueryAttention

D, L, HEADS = 32, 40, 4
TYPES = ("sparse_random", "sparse_programmatic", "sparse_learned")
KW = {  # small key blocks so that every test crosses several blocks
    "sparse_random": {"p": 0.3, "block_size": 8},
    "sparse_programmatic": {"block_size": 8},
    "sparse_learned": {"budget": 0.25, "noise_std": 0.05, "aux_loss_coef": 0.5, "block_size": 8},
}


def build(name, seq_length=L, **kw):
    return neox_zoology.build_mixer(name, hidden_size=D, seq_length=seq_length, num_attention_heads=HEADS,
                                    batch_first=False, **{**KW[name], **kw})


def tokens(batch=3, length=L, vocab=12, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_rel_close(actual, expected, rel=1e-5, msg=None):
    torch.testing.assert_close(actual, expected, atol=rel * expected.abs().max().item() + 1e-12, rtol=rel, msg=msg)


# ---------------------------------------------------------------------------------- selection rules

CRAFTED = torch.tensor([[5, 7, 5, 9, 7, 7, 5, 9, 2],
                        [1, 2, 3, 1, 2, 3, 4, 1, 50000]])
EXPECTED = {
    "token": [[0, 0, 1, 0, 1, 1, 1, 1, 0],
              [0, 0, 0, 1, 1, 1, 0, 1, 0]],
    # bigram ending at t: (7,5) at 6 repeats t=2, (5,9) at 7 repeats t=3; (1,2), (2,3) at 4, 5
    "bigram": [[0, 0, 0, 0, 0, 0, 1, 1, 0],
               [0, 0, 0, 0, 1, 1, 0, 0, 0]],
}


@pytest.mark.parametrize("match", ["token", "bigram"])
def test_programmatic_selection_on_crafted_sequences(match):
    assert programmatic_selection(CRAFTED, match).int().tolist() == EXPECTED[match]


def brute_force_programmatic(ids, match):
    out = torch.zeros(ids.shape, dtype=torch.bool)
    for b, row in enumerate(ids.tolist()):
        for t in range(len(row)):
            if match == "token":
                out[b, t] = row[t] in row[:t]
            elif t > 0:
                out[b, t] = any((row[j - 1], row[j]) == (row[t - 1], row[t]) for j in range(1, t))
    return out


@pytest.mark.parametrize("match", ["token", "bigram"])
def test_programmatic_selection_matches_brute_force(match):
    for vocab in (3, 20, 2**31 - 1):
        ids = tokens(batch=6, length=50, vocab=vocab, seed=vocab)
        assert torch.equal(programmatic_selection(ids, match), brute_force_programmatic(ids, match))


def test_selected_positions_sorted_and_left_padded():
    mask = torch.tensor([[0, 1, 0, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert selected_positions(mask).tolist() == [[1, 3, 4], [-1, -1, -1], [-1, -1, 0]]
    assert selected_positions(torch.zeros(2, 4, dtype=torch.bool)).tolist() == [[-1], [-1]]


def test_random_rate_within_tolerance_changes_every_step_and_is_fixed_in_eval():
    torch.manual_seed(0)
    m = build("sparse_random", p=0.2).mixer
    x = torch.randn(512, 64, D)
    first = m.select(x)
    rate, n = first.float().mean().item(), first.numel()
    assert abs(rate - 0.2) < 5 * math.sqrt(0.2 * 0.8 / n)  # 5 sigma on 32768 Bernoulli draws
    m.train()
    m(x[:16, :2])  # a training step advances the layer's draw counter ...
    second = m.select(x)
    assert not torch.equal(first, second)
    with torch.no_grad():  # ... a forward without grad (activation-checkpoint first pass) does not
        m(x[:16, :2])
    assert torch.equal(m.select(x), second)
    m.eval()
    e1, e2 = m.select(x), m.select(x)
    assert torch.equal(e1, e2) and not torch.equal(e1, second)


def crafted_learned(k=3, noise_std=0.0, **kw):
    """A learned layer whose score is sigmoid(x[..., 0]); x[t, b, 0] = c[b, t]."""
    m = build("sparse_learned", topk=k, budget=None, noise_std=noise_std, **kw).mixer
    with torch.no_grad():
        m.selector.weight.zero_()
        m.selector.weight[0, 0] = 1.0
        m.selector.bias.zero_()
    c = torch.tensor([[0.1, 2.0, -1.0, 3.0, 0.5, 1.5, -2.0, 0.0],
                      [4.0, -1.0, 0.2, 0.3, 3.5, -0.5, 1.0, 0.9]])
    x = torch.zeros(c.shape[1], c.shape[0], D)
    x[:, :, 0] = c.t()
    return m, x, c


def test_learned_topk_picks_the_highest_scores():
    m, x, c = crafted_learned(k=3)
    m.train()
    assert m.select(x).int().tolist() == [[0, 1, 0, 1, 0, 1, 0, 0], [1, 0, 0, 0, 1, 0, 1, 0]]
    torch.testing.assert_close(m.scores(x), torch.sigmoid(c))
    aux = m.after_selection(m.scores(x), 8, advancing=False)[0]
    torch.testing.assert_close(aux, m.aux_loss_coef * torch.relu(torch.sigmoid(c).mean() - 3 / 8))


def test_learned_noise_comes_from_the_layer_generator():
    m, x, c = crafted_learned(k=3, noise_std=2.0)
    m.train()
    noise = 2.0 * torch.randn(c.shape, generator=m.generator(x.device))
    mask = m.select(x)
    assert torch.equal(mask, sparse.topk_selection(torch.sigmoid(c) + noise, 3))
    assert not torch.equal(mask, sparse.topk_selection(torch.sigmoid(c), 3))  # the noise mattered here


def test_threshold_calibrates_to_the_kth_score_and_drives_eval():
    m, x, c = crafted_learned(k=3, threshold_momentum=0.75)
    s = torch.sigmoid(c)
    kth1 = s.topk(3, dim=1).values[:, -1].mean()
    m.train()
    m(x)
    torch.testing.assert_close(m.threshold, kth1)  # the first update takes the value
    m(x * 2)
    kth2 = torch.sigmoid(2 * c).topk(3, dim=1).values[:, -1].mean()
    torch.testing.assert_close(m.threshold, 0.75 * kth1 + 0.25 * kth2)
    m.eval()
    assert torch.equal(m.select(x), s >= m.threshold)
    assert "threshold" in dict(m.state_dict())  # checkpointed


def test_threshold_training_rule_is_causal_and_topk_is_not():
    torch.manual_seed(0)
    for rule, causal in (("threshold", True), ("topk", False)):
        m, x, c = crafted_learned(k=3, train_selection=rule)
        m.train()
        m.threshold.fill_(0.6)
        x2 = x.clone()
        x2[5:, :, 0] = 10.0  # later positions outscore everything
        a, b = m.select(x), m.select(x2)
        assert torch.equal(a[:, :5], b[:, :5]) == causal, rule


# ---------------------------------------------------------------------------------- dense reference


def dense_reference(m, x, mask, gate=None):
    """Full causal attention written out with the layer's weights, rows outside `mask` zeroed and the
    selected rows scaled by `gate` (learned)."""
    s, b, _ = x.shape
    dh = m.head_dim
    qkv = F.linear(x, m.qkv.weight, m.qkv.bias).view(s, b, m.local_heads, 3, dh)
    q, k, v = [qkv[:, :, :, i].permute(1, 2, 0, 3) for i in range(3)]
    q, k = m.rotary(q), m.rotary(k)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(dh)).masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(),
                                                                     float("-inf"))
    y = F.linear((scores.softmax(-1) @ v).permute(2, 0, 1, 3).reshape(s, b, -1), m.out.weight, m.out.bias)
    w = mask.t().float() * (1.0 if gate is None else gate.t())
    return y * w[..., None]


def explicit_aux(m, x):
    s = torch.sigmoid(x @ m.selector.weight[0] + m.selector.bias)
    return m.aux_loss_coef * torch.relu(s.mean() - m.k(x.shape[0]) / x.shape[0])


@pytest.fixture(params=["cpu_flash", "tiles"])
def kernel_path(request, monkeypatch):
    """Both key-block paths: PyTorch's fused CPU flash kernel, and the generic tiles (used on GPUs)."""
    monkeypatch.setattr(kernel, "USE_CPU_FLASH", request.param == "cpu_flash")
    monkeypatch.setattr(kernel, "_TILE_ELEMENTS", 200)  # several row chunks per key block
    return request.param


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,kw", [
    ("sparse_random", {}), ("sparse_random", {"rotary_pct": 0.5, "block_size": 5}),
    ("sparse_programmatic", {}), ("sparse_programmatic", {"match": "bigram", "pos_emb": "none"}),
    ("sparse_learned", {}), ("sparse_learned", {"train_selection": "threshold", "block_size": 64}),
])
def test_equals_dense_masked_attention_forward_and_backward(name, kw, train, kernel_path):
    torch.manual_seed(0)
    layer = build(name, **kw)
    m = layer.mixer
    m.train(train)
    if name == "sparse_learned" and not train:
        m.threshold.fill_(0.5)
    x = torch.randn(L, 3, D, requires_grad=True)
    ids = tokens()
    mask = m.select(x.detach(), ids)
    learned = name == "sparse_learned"
    assert 0 < mask.float().mean() < 1
    g = torch.randn(L, 3, D)
    y = layer(x, token_ids=ids)
    ((y * g).sum()).backward()
    x_ref = x.detach().clone().requires_grad_()
    params = dict(m.named_parameters())
    ref_grads = {}
    with torch.enable_grad():
        gate_ref = torch.sigmoid(x_ref @ m.selector.weight[0] + m.selector.bias).t() if learned else None
        ref = dense_reference(m, x_ref, mask, gate_ref)
        loss = (ref * g).sum() + (explicit_aux(m, x_ref) if learned and train else 0.0)
        grads = torch.autograd.grad(loss, [x_ref, *params.values()])
    ref_grads = dict(zip(params, grads[1:]))
    assert_rel_close(y.detach(), ref.detach())
    assert_rel_close(x.grad, grads[0])
    for n, p in params.items():
        assert_rel_close(p.grad, ref_grads[n], msg=n)
    assert (y.detach().abs().sum(-1) > 0).t().equal(mask)  # unselected positions are left to the residual


@pytest.mark.parametrize("selector", [False, True])
def test_kernel_gradcheck_float64(selector, kernel_path):
    torch.manual_seed(0)
    heads, dh, h, n, b = 2, 4, 8, 11, 2
    dbl = dict(dtype=torch.float64, requires_grad=True)
    x, w, bias = torch.randn(n, b, h, **dbl), torch.randn(heads * 3 * dh, h, **dbl), torch.randn(heads * 3 * dh, **dbl)
    sw, sb = (torch.randn(1, h, **dbl), torch.randn(1, **dbl)) if selector else (None, None)
    mask = torch.tensor([[1, 0, 1, 1, 0, 0, 0, 1, 0, 1, 1], [0] * 9 + [1, 0]], dtype=torch.bool)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 2, 2, dtype=torch.float32) / 2)

    def fn(x, w, bias, *sel):
        rows, scores, _ = SelectedQueryAttention.apply(x, w, bias, *(sel or (None, None)), lambda s: mask, True,
                                                        heads, dh, inv_freq, 2, 3, 2)
        return (rows, scores) if sel else rows

    assert torch.autograd.gradcheck(fn, (x, w, bias) + ((sw, sb) if selector else ()), fast_mode=True)


@pytest.mark.parametrize("name", TYPES)
def test_bf16_runs_close_to_fp32(name, kernel_path):
    torch.manual_seed(0)
    layer = neox_zoology.build_mixer(name, hidden_size=D, seq_length=L, num_attention_heads=HEADS, **KW[name])
    layer.eval()
    ids, x = tokens(), torch.randn(3, L, D)
    y32 = layer(x, token_ids=ids).detach()
    xb = x.bfloat16().requires_grad_()
    y = layer.to(torch.bfloat16)(xb, token_ids=ids)
    y.float().square().sum().backward()
    assert y.dtype == torch.bfloat16 and torch.isfinite(xb.grad.float()).all() and xb.grad.abs().sum() > 0
    assert (y.float() - y32).abs().max() < 0.05 * y32.abs().max()


# ---------------------------------------------------------------------------------- causality


class WithTokens(torch.nn.Module):
    def __init__(self, layer, ids):
        super().__init__()
        self.layer, self.ids = layer, ids

    def forward(self, x):
        return self.layer(x, token_ids=self.ids)


@pytest.mark.parametrize("name", TYPES)
def test_causal_in_eval(name):
    torch.manual_seed(0)
    layer = neox_zoology.build_mixer(name, hidden_size=D, seq_length=L, num_attention_heads=HEADS,
                                     **{**KW[name], **({"p": 0.5} if name == "sparse_random" else {})})
    layer.eval()
    if name == "sparse_learned":
        with torch.no_grad():
            layer.mixer.selector.weight.mul_(20.0)
        layer.mixer.threshold.fill_(0.5)
    ids = tokens(batch=2, vocab=6)
    assert_causal(WithTokens(layer, ids), torch.randn(2, L, D), 17, assert_rel_close)


def test_programmatic_is_causal_in_token_ids():
    torch.manual_seed(0)
    layer = neox_zoology.build_mixer("sparse_programmatic", hidden_size=D, seq_length=L, num_attention_heads=HEADS)
    x, ids = torch.randn(2, L, D), tokens(batch=2, vocab=6)
    ids2 = ids.clone()
    ids2[:, 18:] = tokens(batch=2, vocab=6, seed=1)[:, 18:]
    y, y2 = layer(x, token_ids=ids), layer(x, token_ids=ids2)
    assert_rel_close(y2[:, :18], y[:, :18])
    assert not torch.allclose(y2[:, 18:], y[:, 18:])


def test_programmatic_without_token_ids_is_a_clear_error():
    layer = neox_zoology.build_mixer("sparse_programmatic", hidden_size=D, seq_length=L, num_attention_heads=HEADS)
    with pytest.raises(ValueError, match="sparse_programmatic needs the raw token ids"):
        layer(torch.randn(2, L, D))


# ---------------------------------------------------------------------------------- aux loss


def test_aux_loss_gradient_reaches_the_selector_and_follows_the_scale():
    torch.manual_seed(0)
    m = build("sparse_learned").mixer
    m.train()
    x = torch.randn(L, 3, D, requires_grad=True)
    expected_w, expected_x = torch.autograd.grad(explicit_aux(m, x), [m.selector.weight, x])
    assert expected_w.abs().max() > 0  # the relu is active at initialisation (mean(s) ~ 0.5 > k/L)
    for scale in (1.0, 0.25):
        set_aux_loss_scale(m, scale)
        m.zero_grad()
        x.grad = None
        y, _ = m(x)
        (y * 0.0).sum().backward()  # no language-model gradient: only the aux loss reaches w
        assert_rel_close(m.selector.weight.grad, scale * expected_w)
        assert_rel_close(x.grad, scale * expected_x)


def test_no_aux_loss_in_eval():
    torch.manual_seed(0)
    m = build("sparse_learned").mixer
    m.eval()
    m.threshold.fill_(2.0)  # selects nothing: any gradient to w would come from an aux loss
    x = torch.randn(L, 3, D)
    y, _ = m(x)
    y.sum().backward()
    assert m.selector.weight.grad is None or not m.selector.weight.grad.any()


def test_bad_aux_scale_is_refused():
    with pytest.raises(ValueError, match="aux-loss scale"):
        set_aux_loss_scale(build("sparse_learned").mixer, float("nan"))


def test_collect_stats_averages_since_the_last_call_and_resets():
    torch.manual_seed(0)
    model = torch.nn.ModuleList([build("sparse_learned").mixer, build("sparse_random").mixer])
    model[0].layer_number, model[1].layer_number = 3, 7
    model.train()
    fractions, auxes = [], []
    for step in range(3):
        x = torch.randn(L, 2, D) * (step + 1)
        fractions.append(model[0].select(x).float().mean().item())
        auxes.append(model[0].after_selection(model[0].scores(x), L, advancing=False)[0].item())
        model[0](x)
        model[1](x)
    model.eval()
    model[0](torch.randn(L, 2, D))  # evaluation forwards are not counted
    stats = collect_stats(model)
    assert set(stats) == {"sparse/layer3/aux_loss", "sparse/layer3/selected_fraction", "sparse/layer3/threshold",
                          "sparse/layer7/selected_fraction"}
    assert stats["sparse/layer3/aux_loss"] == pytest.approx(sum(auxes) / 3, rel=1e-5)
    assert stats["sparse/layer3/selected_fraction"] == pytest.approx(sum(fractions) / 3, rel=1e-5)
    assert 0 < stats["sparse/layer7/selected_fraction"] < 1
    assert collect_stats(model) == {}


def test_random_stream_is_part_of_the_state_dict():
    torch.manual_seed(0)
    a, b = build("sparse_random").mixer, build("sparse_random").mixer
    a.train()
    a(torch.randn(L, 2, D))
    assert a.selection_seed != b.selection_seed and a.draws == 1
    b.load_state_dict(a.state_dict())
    assert (b.selection_seed, b.draws) == (a.selection_seed, 1)
    b.train()
    x = torch.randn(L, 2, D)
    assert torch.equal(a.select(x), b.select(x))


# ---------------------------------------------------------------------------------- tensor parallel


def _tp_run(rank, tp, name):
    if tp > 1:
        init_tp(tp)
    torch.manual_seed(0)
    x = torch.randn(L, 3, D, requires_grad=True)
    ids = tokens()
    torch.manual_seed(1)
    layer = build(name)
    layer.train()
    outs = []
    for step in range(2):  # two training steps: new random draws / noise each
        mask = layer.mixer.select(x.detach(), ids)
        y = layer(x, token_ids=ids)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append((mask, y.detach()))
    grads = {n: gather_tp_grad(p) for n, p in layer.named_parameters()}
    return outs, x.grad.detach(), grads


@pytest.mark.parametrize("name", TYPES)
def test_tp2_equals_tp1_including_draws_and_noise(name):
    (o1, gx1, g1), = run_ranks(_tp_run, 1, 1, name)
    assert not torch.equal(o1[0][0], o1[1][0]) or name == "sparse_programmatic"  # draws change per step
    ranks = run_ranks(_tp_run, 2, 2, name)
    for o2, gx2, g2 in ranks:
        for (m1, y1), (m2, y2) in zip(o1, o2):
            assert torch.equal(m2, m1)
            assert_rel_close(y2, y1)
        assert_rel_close(gx2, gx1)
        assert g2.keys() == g1.keys()
        for n in g1:
            assert_rel_close(g2[n], g1[n], msg=n)
    assert torch.equal(ranks[0][0][0][0], ranks[1][0][0][0])


# ---------------------------------------------------------------------------------- through the engines

HYBRID = ["baseconv", "sparse_learned", "sparse_programmatic", "sparse_learned"]


def tiny_raw(**over):
    raw = {
        "num_layers": 4, "hidden_size": D, "num_attention_heads": HEADS, "seq_length": 32, "vocab_size": 64,
        "attention_config": [[HYBRID, "all"]], "norm": "rmsnorm", "activation": "swiglu", "pos_emb": "rotary",
        "intermediate_size": 3 * D,
        "optimizer": {"type": "Adam", "params": {"lr": 0.05}}, "weight_decay": 0.0, "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": 2, "train_iters": 3, "seed": 7,
        "sparse_learned": {"budget": 0.25, "noise_std": 0.05, "aux_loss_coef": 2.0, "block_size": 8},
        "sparse_programmatic": {"match": "token", "block_size": 8}, "baseconv": {"kernel_sizes": [3, -1]},
    }
    raw.update(over)
    return raw


class SyntheticBatches:
    """Micro-batches in data.BatchIterator's order: sample i of the run is a fixed function of i."""

    def __init__(self, args, dp_rank, dp_size):
        self.args, self.dp_rank, self.dp_size, self.step, self.micro = args, dp_rank, dp_size, 0, 0

    def __iter__(self):
        return self

    def __next__(self):
        a = self.args
        mb = a.train_micro_batch_size_per_gpu
        first = self.step * a.global_batch + (self.micro * self.dp_size + self.dp_rank) * mb
        self.micro += 1
        if self.micro == a.gradient_accumulation_steps:
            self.micro, self.step = 0, self.step + 1
        return sample_batch(range(first, first + mb), a.seq_length, a.vocab_size)


def sample_batch(indices, seq_length, vocab):
    rows = [torch.randint(0, vocab // 4, (seq_length + 1,), generator=torch.Generator().manual_seed(i))
            for i in indices]
    data = torch.stack(rows)
    return data[:, :-1], (data[:, 1:], torch.ones(len(rows), seq_length))


def _train_sgd(rank, raw, world, steps):
    """Train through the project's engine with plain SGD (so a step moves w by exactly -lr x grad)."""
    from megatron.core import parallel_state

    from neox_zoology.parallel import setup as psetup
    from neox_zoology.parallel.cpu_compat import model_parallel_seed
    from neox_zoology.training import engine as engine_mod
    from neox_zoology.tokenizer import resolve_vocab
    from neox_zoology.training.loop import train_step

    def sgd(args, model):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)

    engine_mod.make_optimizer = sgd
    args = build_args(raw, world_size=world)
    psetup.init_distributed("gloo")
    topo = psetup.init_model_parallel(args.tp, args.pp)
    try:
        model_parallel_seed(args.seed)
        resolve_vocab(args)
        engine = engine_mod.build_engine(args, topo)
        set_aux_loss_scale(engine, 1.0 / args.gradient_accumulation_steps)  # what the trainer sets (fp32: no loss scale)
        batches = SyntheticBatches(args, parallel_state.get_data_parallel_rank(),
                                   parallel_state.get_data_parallel_world_size())
        losses = [float(train_step(engine, batches, torch.device("cpu"))) for _ in range(steps)]
        stats = collect_stats(engine)
        selectors = {layer.layer_number: layer.selector.weight.detach().clone()
                     for layer in sparse.sparse_layers(engine) if hasattr(layer, "selector")}
        return losses, selectors, stats
    finally:
        psetup.destroy()


def merged_selectors(results):
    out = {}
    for _, selectors, _ in results:
        out.update(selectors)
    return out


def test_pp2_equals_pp1_for_a_learned_hybrid_including_the_aux_gradient():
    raw = tiny_raw(pipe_parallel_size=1, optimizer={"type": "Adam", "params": {"lr": 0.5}})
    pp1 = run_ranks(_train_sgd, 1, raw, 1, 3)
    pp2 = run_ranks(_train_sgd, 2, {**raw, "pipe_parallel_size": 2}, 2, 3)
    losses1, sel1, stats1 = pp1[0]
    sel2 = merged_selectors(pp2)
    assert sorted(sel1) == sorted(sel2) == [2, 4]
    assert [sorted(s) for _, s, _ in pp2] == [[2], [4]]  # one learned layer per stage (the first is not the last)
    for losses2, _, stats2 in pp2:
        assert losses2 == pytest.approx(losses1, abs=1e-5)
        assert stats2.keys() == stats1.keys()
        for key in stats1:
            assert stats2[key] == pytest.approx(stats1[key], rel=1e-5, abs=1e-7), key
    for n in sel1:
        torch.testing.assert_close(sel2[n], sel1[n], atol=1e-6, rtol=1e-5)
    assert stats1["sparse/layer2/aux_loss"] > 0 and "sparse/layer3/selected_fraction" in stats1


def reference_step(raw, micro_batches):
    """One SGD step by hand: mean over micro-batches of (LM loss + each layer's explicit aux loss)."""
    from neox_zoology.model.gpt import SequentialGPT, lm_loss
    from neox_zoology.training.engine import model_config
    from neox_zoology.tokenizer import resolve_vocab

    args = build_args(raw, world_size=1)
    resolve_vocab(args)
    model = SequentialGPT(args, model_config(args))
    model.train()
    layers = [m for m in sparse.sparse_layers(model) if hasattr(m, "selector")]
    inputs = {}
    for layer in layers:
        layer.register_forward_hook(lambda mod, a, kw, out: inputs.__setitem__(mod, a[0]), with_kwargs=True)
    set_aux_loss_scale(model, 0.0)  # the aux loss is added to the loss explicitly instead
    total = 0.0
    for batch in micro_batches:
        tokens, labels = batch
        loss = lm_loss(model(tokens), labels)
        total = total + (loss + sum(explicit_aux(layer, inputs[layer]) for layer in layers)) / len(micro_batches)
    total.backward()
    return {layer.layer_number: (layer.selector.weight - args.lr * layer.selector.weight.grad).detach()
            for layer in layers}


def test_aux_gradient_is_scaled_like_the_loss_under_accumulation_and_data_parallel():
    raw = tiny_raw(attention_config=[[["baseconv", "sparse_learned"], "all"]], train_micro_batch_size_per_gpu=2,
                   optimizer={"type": "Adam", "params": {"lr": 0.5}},
                   sparse_learned={"budget": 0.25, "noise_std": 0.0, "aux_loss_coef": 2.0, "block_size": 8})
    ga2 = run_ranks(_train_sgd, 1, {**raw, "gradient_accumulation_steps": 2}, 1, 1)[0][1]
    dp2 = run_ranks(_train_sgd, 2, {**raw, "gradient_accumulation_steps": 1}, 2, 1)
    ref = reference_step(raw, [sample_batch(range(0, 2), 32, 64), sample_batch(range(2, 4), 32, 64)])
    assert sorted(ref) == [2, 4]
    for n in ref:
        torch.testing.assert_close(ga2[n], ref[n], atol=1e-6, rtol=1e-5)
        for _, selectors, _ in dp2:
            torch.testing.assert_close(selectors[n], ref[n], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------- validation

BAD = [
    ("sparse_random", {"p": 0}, "sparse_random.p: 0 is outside (0, 1]"),
    ("sparse_random", {"p": 1.5}, "sparse_random.p: 1.5 is outside (0, 1]"),
    ("sparse_learned", {"topk": L + 1}, f"sparse_learned.topk: {L + 1}; use a number of positions in [1, seq_length "
                                        f"{L}]"),
    ("sparse_learned", {"topk": 0}, "sparse_learned.topk: 0"),
    ("sparse_learned", {"budget": 0.0}, "sparse_learned.budget: 0.0 is outside (0, 1]"),
    ("sparse_learned", {"budget": 1.2}, "sparse_learned.budget: 1.2 is outside (0, 1]"),
    ("sparse_learned", {"topk": 4, "budget": 0.5}, "both topk (4) and budget (0.5) are set; set one of them"),
    ("sparse_learned", {"train_selection": "sample"}, "sparse_learned.train_selection: 'sample'"),
    ("sparse_learned", {"noise_std": -1}, "sparse_learned.noise_std: -1"),
    ("sparse_learned", {"threshold_momentum": 1.0}, "sparse_learned.threshold_momentum: 1.0"),
    ("sparse_programmatic", {"match": "trigram"}, "sparse_programmatic.match: 'trigram'; use 'token'"),
    ("sparse_random", {"attention_dropout": 0.1}, "attention_dropout 0.1 is not supported"),
    ("sparse_random", {"block_size": -1}, "sparse_random.block_size: -1"),
]


@pytest.mark.parametrize("name,kw,message", BAD)
def test_bad_arguments_are_clear_errors(name, kw, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        neox_zoology.build_mixer(name, hidden_size=D, seq_length=L, num_attention_heads=HEADS, **kw)


def test_config_time_errors_name_the_file_key_and_fix():
    base = {"num_layers": 2, "hidden_size": D, "num_attention_heads": HEADS, "seq_length": 64, "vocab_size": 64}
    with pytest.raises(ConfigError, match=r"config: sparse_learned.topk: 100; use a number of positions in "
                                          r"\[1, seq_length 64\]"):
        build_args({**base, "attention_config": [[["baseconv", "sparse_learned"], "all"]],
                    "sparse_learned": {"topk": 100}}, world_size=1)
    with pytest.raises(ConfigError, match=r"sparse_random.p: -0.5 is outside \(0, 1\]"):
        build_args({**base, "attention_config": [[["sparse_random"], "all"]], "sparse_random": {"p": -0.5}},
                   world_size=1)
    with pytest.raises(ConfigError, match="attention_dropout 0.1 is not supported by sparse attention layers"):
        build_args({**base, "attention_config": [[["sparse_learned"], "all"]], "attention_dropout": 0.1}, world_size=1)


def test_programmatic_refused_where_token_ids_cannot_reach_it():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class ShapeWithoutTokenIds(registry.Shape):
        token_ids: bool = False

    spec = registry.get("sparse_programmatic")
    assert spec.needs_token_ids and not registry.get("sparse_learned").needs_token_ids
    args = registry.resolve_args("sparse_programmatic", {})
    problems = spec.validate(ShapeWithoutTokenIds(hidden_size=D, seq_length=L, num_attention_heads=HEADS), args)
    assert any("raw token ids cannot reach this layer" in p for p in problems), problems
    assert spec.validate(registry.Shape(hidden_size=D, seq_length=L, num_attention_heads=HEADS), args) == []


def test_parameters_and_flops():
    d, length = 64, 128
    for name in TYPES:
        with torch.device("meta"):
            m = neox_zoology.build_mixer(name, hidden_size=d, seq_length=length, num_attention_heads=4)
        extra = d + 1 if name == "sparse_learned" else 0
        assert sum(p.numel() for p in m.parameters()) == 4 * d * d + 4 * d + extra
    shape = registry.Shape(hidden_size=d, seq_length=length, num_attention_heads=4)
    full = registry.get("attention").flops(shape, registry.resolve_args("attention", {}))
    rand = registry.get("sparse_random").flops(shape, registry.resolve_args("sparse_random", {"p": 0.125}))
    assert rand == pytest.approx(2 * 2 * d * d + 0.125 * (4 * d * d + 4 * length * d))
    assert rand < full


# ---------------------------------------------------------------------------------- paper-scale configs

PAPER_M = {"160m": {"random": 162, "programmatic": 162, "learned": 166, "attention": 166},
           "360m": {"random": 365, "programmatic": 365, "learned": 351, "attention": 351}}
CONFIGS = [(sel, scale) for scale in PAPER_M for sel in PAPER_M[scale]]


@pytest.mark.parametrize("sel,scale", CONFIGS, ids=[f"{s}_{c}" for s, c in CONFIGS])
def test_hybrid_configs_match_the_paper(sel, scale):
    from neox_zoology.training.dryrun import summarize

    args = load([ROOT / f"configs/neox/baseconv_{sel}_{scale}.yml"], world_size=1)
    types = args.layer_types
    special = [i for i, t in enumerate(types) if t != "baseconv"]
    assert [types[i] for i in special] == [sel if sel == "attention" else f"sparse_{sel}"] * 3
    n = len(types)
    for j, i in enumerate(special):  # evenly interspersed: layer i near the middle of the j-th third
        assert abs(i - (n * (2 * j + 1) / 6 - 0.5)) <= 1, special
    got = summarize(args)["parameters"] / 1e6
    assert abs(got / PAPER_M[scale][sel] - 1) <= 0.10, f"{got:.1f}M vs paper {PAPER_M[scale][sel]}M"


def _train_config(rank, args):
    from megatron.core import parallel_state

    from neox_zoology.data import BatchIterator, build_datasets
    from neox_zoology.parallel import setup as psetup
    from neox_zoology.parallel.cpu_compat import model_parallel_seed
    from neox_zoology.training.engine import build_engine
    from neox_zoology.tokenizer import load_tokenizer, resolve_vocab
    from neox_zoology.training.loop import train_step

    psetup.init_distributed("gloo")
    topo = psetup.init_model_parallel(args.tp, args.pp)
    try:
        model_parallel_seed(args.seed)
        tokenizer = load_tokenizer(args)
        resolve_vocab(args, tokenizer)
        engine = build_engine(args, topo)
        splits = build_datasets(args, tokenizer, 0)
        batches = BatchIterator(splits.train, args.train_micro_batch_size_per_gpu, args.gradient_accumulation_steps,
                                parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size())
        set_aux_loss_scale(engine, 1.0 / args.gradient_accumulation_steps)
        losses = [float(train_step(engine, batches, torch.device("cpu"))) for _ in range(args.train_iters)]
        return losses, collect_stats(engine)
    finally:
        psetup.destroy()


@pytest.mark.parametrize("sel", ["random", "programmatic", "learned"])
def test_160m_hybrids_train_on_cpu_with_stats(sel, tiny_corpus, tmp_path):
    """The 160M configs with a CPU override: short sequences, the demo tokenizer, and a narrow width
    (768 -> 64) so that three models train in seconds; every other key is the config's."""
    sets = ["seq_length=64", "hidden_size=64", "num_attention_heads=4", "bf16={enabled: false}", "vocab_size=null",
            "train_micro_batch_size_per_gpu=2", "train_batch_size=4", "train_iters=2", "lr_decay_iters=2",
            "eval_iters=0", "split='90,10,0'", f"data_path={tiny_corpus['data_prefix']}", "tokenizer_type=SPMTokenizer",
            f"vocab_file={tiny_corpus['tokenizer']}", f"data_cache_path={tmp_path}"]
    args = load([ROOT / f"configs/neox/baseconv_{sel}_160m.yml"], sets=PAPER_RUN_KEYS_OFF + sets, world_size=1)
    assert args.gradient_accumulation_steps == 2 and args.pp == 1 and args.pipe_parallel_size == 1
    losses, stats = run_ranks(_train_config, 1, args)[0]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)
    layers = [i + 1 for i, t in enumerate(args.layer_types) if t.startswith("sparse_")]
    for n in layers:
        assert 0 < stats[f"sparse/layer{n}/selected_fraction"] <= 1
        assert (f"sparse/layer{n}/aux_loss" in stats) == (sel == "learned")


def test_validation_never_raises_on_arbitrary_values():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    values = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                       st.text(max_size=5), st.lists(st.integers(), max_size=2),
                       st.dictionaries(st.text(max_size=3), st.integers(), max_size=1))
    shape = registry.Shape(hidden_size=D, seq_length=L, num_attention_heads=HEADS)

    @settings(max_examples=150, deadline=None)
    @given(name=st.sampled_from(TYPES), data=st.data())
    def check(name, data):
        spec = registry.get(name)
        keys = st.sampled_from(sorted(spec.defaults))
        args = {**spec.defaults, **data.draw(st.dictionaries(keys, values, max_size=3))}
        problems = spec.validate(shape, args)
        assert isinstance(problems, list) and all(isinstance(p, str) and name in p for p in problems)

    check()


def _run_loop(rank, raw, world):
    from neox_zoology.training.loop import run

    return run(build_args(raw, world_size=world))


@pytest.mark.parametrize("pipe", [0, 1], ids=["plain", "pipe"])
def test_checkpoint_resume_continues_the_random_stream_and_threshold(tiny_raw, tmp_path, pipe):
    raw = tiny_raw(attention_config=[[["baseconv", "sparse_random", "sparse_learned", "baseconv"], "all"]],
                   pipe_parallel_size=pipe, train_iters=4, sparse_learned={"budget": 0.25, "noise_std": 0.05,
                                                                         "train_selection": "threshold"})
    straight = run_ranks(_run_loop, 1, {**raw, "save": str(tmp_path / "a")}, 1)[0]
    run_ranks(_run_loop, 1, {**raw, "train_iters": 2, "lr_decay_iters": 4, "save": str(tmp_path / "b")}, 1)
    resumed = run_ranks(_run_loop, 1, {**raw, "save": str(tmp_path / "b"), "load": str(tmp_path / "b")}, 1)[0]
    assert resumed["start_iteration"] == 2
    assert [l for _, l in resumed["losses"]] == [l for _, l in straight["losses"]][2:]  # bit-exact

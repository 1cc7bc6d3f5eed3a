"""Decoding with recurrent state: prefill + one-token steps equal the full forward for every layer type;
greedy decoding is deterministic; checkpoints saved at TP = 2 and PP = 2 load into one process equal to
the model that saved them."""
import pytest
import torch

from dist import run_ranks
from neox_zoology import inference, registry
from neox_zoology.config import build_args
from neox_zoology.inference.sampling import Sampling, generate

L = 24


def tiny(types, vocab=100, **keys):
    raw = {"num_layers": len(types), "hidden_size": 32, "num_attention_heads": 4, "seq_length": L,
           "attention_config": [[[registry.config_name(t)], 1] for t in types], "norm": "rmsnorm",
           "activation": "swiglu", "intermediate_size": 192, "pos_emb": "rotary", "vocab_size": vocab,
           "train_micro_batch_size_per_gpu": 1, "seed": 3}
    raw.update(keys)
    args = build_args(raw, world_size=1)
    args.padded_vocab_size = 128
    model = inference.build(args)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # move every weight off its initial value (some start at exact zeros / below thresholds)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def tokens(b=2, s=20, vocab=100, seed=1):
    t = torch.randint(0, vocab // 3, (b, s), generator=torch.Generator().manual_seed(seed))
    return t  # a third of the vocabulary: tokens repeat, so programmatic selection has positions to pick


def assert_steps_match(model, tok, split):
    full = model(tok)
    logits, state = model.prefill(tok[:, :split])
    torch.testing.assert_close(logits, full[:, :split], rtol=1e-5, atol=1e-5 * full.abs().max().item())
    for t in range(split, tok.shape[1]):
        step_logits, state = model.step(tok[:, t], state)
        torch.testing.assert_close(step_logits, full[:, t], rtol=1e-5, atol=1e-5 * full[:, t].abs().max().item(),
                                   msg=lambda m: f"position {t}: {m}")


@pytest.mark.parametrize("name", registry.names())
def test_prefill_then_steps_equal_the_full_forward(name):
    torch.manual_seed(0)
    model = tiny([name, name])  # two layers: per-layer cycles (BaseConv's short and long filter) both appear
    assert_steps_match(model, tokens(), split=7)


@pytest.mark.parametrize("name", registry.names())
def test_steps_from_the_initial_state_equal_the_full_forward(name):
    torch.manual_seed(0)
    model = tiny([name])
    tok = tokens(b=3, s=10)
    full = model(tok)
    state = model.initial_state(3)
    for t in range(tok.shape[1]):
        logits, state = model.step(tok[:, t], state)
        torch.testing.assert_close(logits, full[:, t], rtol=1e-5, atol=1e-5 * full[:, t].abs().max().item())


VARIANTS = {
    "sliding-window-wraps": (["sliding_window", "attention"], {"sliding_window": {"window": 4}}),
    "gqa": (["attention"], {"num_kv_heads": 2}),
    "learned-positions-parallel-residual": (["attention", "baseconv"], {"pos_emb": "learned", "gpt_j_residual": True,
                                                                        "max_position_embeddings": L}),
    "h3-heads-zoh": (["h3"], {"h3": {"head_dim": 2, "discretization": "zoh", "d_state": 8}}),
    "baseconv-explicit-act": (["baseconv", "baseconv"], {"baseconv": {"long_filter": "explicit", "use_act": True,
                                                                      "fft_skip": False}}),
    "untied-layernorm-gelu": (["gated_deltanet", "attention"], {"no_weight_tying": True, "norm": "layernorm",
                                                                "activation": "gelu", "intermediate_size": 128}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_decode_like_the_full_forward(variant):
    torch.manual_seed(0)
    types, keys = VARIANTS[variant]
    assert_steps_match(tiny(types, **keys), tokens(s=L), split=5)


ONE_PASS = ["based", "gla", "gated_deltanet", "mamba", "hyena", "h3", "rwkv"]
"""Layer types whose prompt state comes from the full-sequence forward (no token loop)."""


def assert_states_close(ours, stepped, where="state"):
    assert type(ours) is type(stepped) or (torch.is_tensor(ours) and torch.is_tensor(stepped)), where
    if torch.is_tensor(ours):
        assert ours.shape == stepped.shape and ours.dtype == stepped.dtype, f"{where}: {ours.shape} {stepped.shape}"
        torch.testing.assert_close(ours, stepped, rtol=1e-10, atol=1e-10 * max(1.0, stepped.abs().amax().item() if stepped.numel() else 0.0),
                                   msg=lambda m: f"{where}: {m}")
    elif isinstance(ours, dict):
        assert ours.keys() == stepped.keys(), where
        for key in ours:
            assert_states_close(ours[key], stepped[key], f"{where}.{key}")
    elif isinstance(ours, (list, tuple)):
        assert len(ours) == len(stepped), where
        for i, (a, b) in enumerate(zip(ours, stepped)):
            assert_states_close(a, b, f"{where}[{i}]")
    else:
        assert ours == stepped, where


STATE_VARIANTS = {
    "based-conv": ("based", {"based": {"conv_size": 3, "chunk_size": 4}}),
    "gla-conv-chunk": ("gla", {"gla": {"conv_size": 4, "chunk_size": 4}}),
    "gated_deltanet-chunk": ("gated_deltanet", {"gated_deltanet": {"chunk_size": 4}}),
    "gated_deltanet-noconv": ("gated_deltanet", {"gated_deltanet": {"conv_size": 0, "chunk_size": 8}}),
    "mamba-chunk": ("mamba", {"mamba": {"chunk_size": 4}}),
    "h3-heads-zoh": ("h3", {"h3": {"head_dim": 2, "discretization": "zoh", "d_state": 8}}),
    "rwkv-chunk": ("rwkv", {"rwkv": {"wkv_chunk": 3}}),
}


@pytest.mark.parametrize("case", registry.names() + sorted(STATE_VARIANTS))
def test_one_pass_prefill_state_equals_the_stepped_state(case):
    """fp64: the state a mixer (and a stateful MLP) builds from a whole prompt equals stepping the prompt
    token by token, and its one-pass output equals its forward."""
    from neox_zoology.inference.model import _stepped_state, mixer_prefill, prefill_state, stateful

    name, keys = STATE_VARIANTS.get(case, (case, {}))
    torch.manual_seed(0)
    model = tiny([name, name], **keys).double()
    if name in ONE_PASS:
        assert all(callable(getattr(b.mixer, "prefill", None)) for b in model.blocks), name
    tok = tokens(s=19)
    x = torch.randn(19, 2, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            ids, need = (tok if block.needs_token_ids else None), block.needs_token_ids
            out, bias, state = mixer_prefill(block.mixer, x, ids, need)
            ref, ref_bias = block.mixer(x, token_ids=ids)
            torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
            assert (bias is None) == (ref_bias is None)
            assert_states_close(state, _stepped_state(block.mixer, x, ids, need), f"layer {i} mixer")
            if block.mlp is not None and stateful(block.mlp):
                assert_states_close(prefill_state(block.mlp, x), _stepped_state(block.mlp, x, None, False),
                                    f"layer {i} mlp")


def test_h3_modes_in_closed_form_carry_across_chunks():
    torch.manual_seed(0)
    mixer = tiny(["h3"], h3={"head_dim": 2, "d_state": 8}).double().blocks[0].mixer
    kv = torch.randn(2, 16, 2, 2, 23, dtype=torch.float64)
    whole = mixer._modes(kv)
    torch.testing.assert_close(mixer._modes(kv, chunk=5), whole, rtol=1e-12, atol=1e-12)
    state = {"x": torch.zeros_like(whole)}  # the recurrence x <- z x + kv, position by position
    z = torch.exp(mixer.ssm.discrete()[1])[None, :, None, None]
    for t in range(kv.shape[-1]):
        state["x"] = z * state["x"] + kv[..., t, None]
    torch.testing.assert_close(whole, state["x"], rtol=1e-10, atol=1e-10)


def test_long_filters_refuse_positions_past_seq_length():
    model = tiny(["baseconv", "baseconv"])
    _, state = model.prefill(tokens(s=L))
    with pytest.raises(ValueError, match="past the long filter"):
        model.step(torch.zeros(2, dtype=torch.long), state)


def test_state_bytes_grow_for_attention_and_stay_flat_for_recurrent_layers():
    def grows(types, **keys):
        model = tiny(types, **keys)
        return [inference.state_bytes(model.prefill(tokens(s=s))[1]) for s in (4, 16)]

    small, large = grows(["attention"])
    assert large == 4 * small
    small, large = grows(["gated_deltanet"])
    assert large == small
    small, large = grows(["baseconv"], baseconv={"kernel_sizes": [3]})
    assert large == small


@pytest.mark.parametrize("name", ["attention", "baseconv", "sparse_programmatic", "rwkv"])
def test_greedy_decoding_is_deterministic_and_follows_the_argmax(name):
    model = tiny([name, name])
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 9, 9, 9, 9]]
    cfg = Sampling(temperature=0.0, max_tokens=8)
    first, second = generate(model, prompts, cfg), generate(model, prompts, cfg)
    assert first.tokens == second.tokens
    for prompt, new in zip(prompts, first.tokens):  # each new token is the argmax of the full forward before it
        seq = torch.tensor([prompt + new])
        expect = model(seq)[0, len(prompt) - 1:-1, :model.vocab_size].argmax(-1)
        assert new == expect.tolist()


def test_sampling_is_reproducible_by_seed_and_stops_on_eod():
    model = tiny(["attention"])
    prompts = [[1, 2, 3], [4, 5, 6]]
    a = generate(model, prompts, Sampling(temperature=1.0, top_k=5, top_p=0.9, max_tokens=10, seed=4))
    b = generate(model, prompts, Sampling(temperature=1.0, top_k=5, top_p=0.9, max_tokens=10, seed=4))
    assert a.tokens == b.tokens and all(len(t) == 10 for t in a.tokens)
    eod = a.tokens[0][2]
    c = generate(model, prompts, Sampling(temperature=1.0, top_k=5, top_p=0.9, max_tokens=10, seed=4, eod=eod))
    assert c.tokens[0] == a.tokens[0][:a.tokens[0].index(eod) + 1]


def test_top_k_and_top_p_filters():
    from neox_zoology.inference.sampling import filter_logits

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.81)).tolist() == [[True, True, True, False]]


# ----------------------------------------------------------------------------- checkpoints at TP = 2 / PP = 2

PROBE = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(5))


def _logits_hook(captured):
    def factory(args, engine, *rest, **kw):
        def hook(iteration, folder):
            from megatron.core import parallel_state

            from neox_zoology.parallel import tp_size

            module = engine.module
            module.eval()
            with torch.no_grad():
                if args.pipe_parallel_size >= 2:  # run the two stages by hand: stage 0 sends its hidden states
                    stage = parallel_state.get_pipeline_model_parallel_rank()
                    if stage == 0:
                        x, _ = module(PROBE)
                        torch.distributed.send(x.contiguous(), dst=1)
                        out = None
                    else:
                        x = torch.empty(PROBE.shape[1], PROBE.shape[0], args.hidden_size)
                        torch.distributed.recv(x, src=0)
                        out = module((x, PROBE))
                else:
                    out = module(PROBE)
                if out is not None and tp_size() > 1:
                    parts = [torch.empty_like(out) for _ in range(tp_size())]
                    torch.distributed.all_gather(parts, out.contiguous(),
                                                 group=parallel_state.get_tensor_model_parallel_group())
                    out = torch.cat(parts, dim=-1)
            captured.append(out)
            module.train()

        return hook

    return factory


def _train_and_probe(rank, raw, world):
    from neox_zoology.training.loop import run

    captured = []
    run(build_args(raw, world_size=world), after_save=[_logits_hook(captured)])
    return captured[-1]


@pytest.mark.parametrize("layout", [{"model_parallel_size": 2, "pipe_parallel_size": 0},
                                    {"pipe_parallel_size": 2}], ids=["tp2", "pp2"])
@pytest.mark.parametrize("layers", [["baseconv", "attention"], ["hyena", "gated_deltanet"]])
def test_a_checkpoint_saved_in_parallel_loads_equal_to_the_model_that_saved_it(tiny_raw, tmp_path, layout, layers):
    raw = tiny_raw(train_iters=2, save=str(tmp_path / "ckpt"), attention_config=[[layers, "all"]], **layout)
    outs = [o for o in run_ranks(_train_and_probe, 2, raw, 2) if o is not None]
    model = inference.load(tmp_path / "ckpt")
    ours = model(PROBE)
    torch.testing.assert_close(ours, outs[0], rtol=1e-5, atol=1e-5)
    # and decoding from the loaded checkpoint equals its full forward
    assert_steps_match(model, PROBE[:, :10], split=4)


def test_load_names_what_is_missing(tmp_path):
    with pytest.raises(inference.LoadError, match="not a checkpoint"):
        inference.load(tmp_path)

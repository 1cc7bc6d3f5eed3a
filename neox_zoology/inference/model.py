"""A trained GPT as a single-process decoder: `prefill(tokens)` and `step(token, state)`.

The layers are the training model's own modules (`SequentialGPT` built at TP = PP = 1); decoding asks
each mixer for its recurrent state through `initial_state(batch, dtype, device)` and
`step(x [b, h], state) -> (y [b, h], state)`, and where a mixer can build its state from a whole prompt at
once `prefill(x [s, b, h]) -> (y, bias, state)` (forward and state in one pass) or `prefill_state(x, token_ids)`;
otherwise the prompt is stepped through. A block MLP with a state of its own (RWKV's channel mix) declares
the same pair. Nothing here names a layer type.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neox_zoology.model.block import ZooBlock
from neox_zoology.model.gpt import EmbeddingPipe, FinalNormPipe, LMHeadPipe


def state_bytes(state) -> int:
    """Bytes held by the tensors of a (nested) decoding state."""
    if torch.is_tensor(state):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def _stepped_state(module, x: torch.Tensor, token_ids, needs_ids: bool):
    """The state after stepping `module` through x [s, b, h] from its initial state (exact, O(s) steps)."""
    state = module.initial_state(x.shape[1], x.dtype, x.device)
    for t in range(x.shape[0]):
        kw = {"token_ids": token_ids[:, t]} if needs_ids else {}
        _, state = module.step(x[t], state, **kw)
    return state


def prefill_state(module, x: torch.Tensor, token_ids=None, needs_ids: bool = False):
    """The decoding state of a mixer (or stateful MLP) after the positions of x [s, b, h]."""
    if callable(getattr(module, "prefill", None)):
        return mixer_prefill(module, x, token_ids, needs_ids)[2]
    fast = getattr(module, "prefill_state", None)
    if fast is not None:
        return fast(x, token_ids) if needs_ids else fast(x)
    return _stepped_state(module, x, token_ids, needs_ids)


def mixer_prefill(mixer, x: torch.Tensor, token_ids=None, needs_ids: bool = False):
    """(output, bias, state after x [s, b, h]): one pass where the mixer declares `prefill(x)`, else its
    forward and `prefill_state` (or the prompt stepped through)."""
    if callable(getattr(mixer, "prefill", None)):
        return mixer.prefill(x, token_ids=token_ids) if needs_ids else mixer.prefill(x)
    out, bias = mixer(x, token_ids=token_ids)
    fast = getattr(mixer, "prefill_state", None)
    if fast is not None:
        return out, bias, (fast(x, token_ids) if needs_ids else fast(x))
    return out, bias, _stepped_state(mixer, x, token_ids, needs_ids)


def stateful(module) -> bool:
    return callable(getattr(module, "initial_state", None)) and callable(getattr(module, "step", None))


class InferenceModel(nn.Module):
    """Wraps a `SequentialGPT` (TP = PP = 1, eval mode). Logits cover the padded vocabulary."""

    def __init__(self, gpt: nn.Module, args):
        super().__init__()
        self.gpt = gpt.eval()
        self.args = args
        layers = [m for m, _ in gpt._forward_fns]
        self.embed: EmbeddingPipe = layers[0]
        self.blocks: list[ZooBlock] = [m for m in layers if isinstance(m, ZooBlock)]
        self.final_norm: FinalNormPipe = next(m for m in layers if isinstance(m, FinalNormPipe))
        head = layers[-1]
        self.head_weight = head.proj.weight if isinstance(head, LMHeadPipe) else self.embed.word_embeddings.weight
        self.vocab_size = int(args.vocab_size or args.padded_vocab_size)
        self.max_positions = args.max_position_embeddings if args.pos_emb == "learned" else None
        limits = [getattr(b.mixer, "decode_limit", None) for b in self.blocks] + [self.max_positions]
        self.context_limit = min((n for n in limits if n), default=None)
        """Most positions (prompt + generated) the model can decode: learned positions and long filters end."""
        for block in self.blocks:
            if not stateful(block.mixer):
                raise TypeError(f"layer type {block.layer_type}: its mixer {type(block.mixer).__name__} declares no "
                                f"decoding state (initial_state / step); it cannot generate")

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, s] -> logits [b, s, V] (the training model's forward)."""
        return self.gpt(tokens)

    def _check_position(self, pos: int) -> None:
        if self.max_positions is not None and pos >= self.max_positions:
            raise ValueError(f"position {pos} is past max_position_embeddings {self.max_positions} of this model "
                             f"(learned position embeddings); shorten the prompt or max tokens")

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor):
        """tokens [b, s] -> (logits [b, s, V], state after position s - 1)."""
        tokens = tokens.long()
        self._check_position(tokens.shape[1] - 1)
        x, _ = self.embed(tokens)  # [s, b, h]
        states = []
        for block in self.blocks:
            ids = tokens if block.needs_token_ids else None
            n = block.input_norm(x)
            m, bias, mixer_state = mixer_prefill(block.mixer, n, ids, block.needs_token_ids)
            if bias is not None:
                m = m + bias
            if block.mlp is None:  # a block of a mixer without an MLP (mamba's default)
                x = x + m
                states.append({"mixer": mixer_state, "mlp": None})
                continue
            if block.parallel_residual:
                mlp_in = block.post_norm(x)
                x = x + m + block.mlp(mlp_in)
            else:
                x = x + m
                mlp_in = block.post_norm(x)
                x = x + block.mlp(mlp_in)
            mlp_state = prefill_state(block.mlp, mlp_in) if stateful(block.mlp) else None
            states.append({"mixer": mixer_state, "mlp": mlp_state})
        logits = F.linear(self.final_norm((x, None)), self.head_weight).transpose(0, 1)
        return logits, {"layers": states, "pos": tokens.shape[1]}

    def initial_state(self, batch: int, dtype=torch.float32, device=None) -> dict:
        """The state before any token (decode from scratch with `step`)."""
        layers = [{"mixer": b.mixer.initial_state(batch, dtype, device),
                   "mlp": b.mlp.initial_state(batch, dtype, device) if b.mlp is not None and stateful(b.mlp) else None}
                  for b in self.blocks]
        return {"layers": layers, "pos": 0}

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, state: dict):
        """tokens [b] (the next token of each row) -> (logits [b, V], new state)."""
        tokens = tokens.long()
        pos = state["pos"]
        self._check_position(pos)
        x = self.embed.word_embeddings(tokens)  # [b, h]
        if self.embed.position_embeddings is not None:
            x = x + self.embed.position_embeddings.weight[pos]
        new = []
        for block, layer in zip(self.blocks, state["layers"]):
            kw = {"token_ids": tokens} if block.needs_token_ids else {}
            m, mixer_state = block.mixer.step(block.input_norm(x), layer["mixer"], **kw)
            mlp_state = layer["mlp"]
            if block.mlp is None:
                x = x + m
                new.append({"mixer": mixer_state, "mlp": None})
                continue
            if block.parallel_residual:
                mlp_in = block.post_norm(x)
                x = x + m
            else:
                x = x + m
                mlp_in = block.post_norm(x)
            if mlp_state is not None:
                f, mlp_state = block.mlp.step(mlp_in, mlp_state)
            else:
                f = block.mlp(mlp_in)
            x = x + f
            new.append({"mixer": mixer_state, "mlp": mlp_state})
        logits = F.linear(self.final_norm.norm(x), self.head_weight)
        return logits, {"layers": new, "pos": pos + 1}

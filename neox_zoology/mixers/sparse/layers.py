"""The sparse layers: attention at the query positions a subclass chooses, the learned layer's auxiliary
sparsity loss, and the statistics the trainer logs (see docs/sparse.md)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from neox_zoology.mixers.attention import Rotary
from neox_zoology.mixers.base import Mixer
from neox_zoology.mixers.sparse.kernel import SelectedQueryAttention, score_logits, tile_sizes
from neox_zoology.mixers.sparse.selection import (dp_mean, dp_rank, learned_k, mix_seed, programmatic_selection,
                                                   topk_selection)
from neox_zoology.parallel import ColumnLinear, RowLinear, copy_to_tp, tp_rank, tp_size


class AuxLossInjector(torch.autograd.Function):
    """Identity on `activations`; in backward also sends d(aux_loss * scale)/d(inputs) into aux_loss's graph."""

    @staticmethod
    def forward(ctx, activations, aux_loss, scale: float):
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return activations

    @staticmethod
    def backward(ctx, grad):
        (aux_loss,) = ctx.saved_tensors
        return grad, torch.full_like(aux_loss, ctx.scale), None


class SparseAttention(Mixer):
    """Attention at selected query positions; subclasses choose the positions (`chooser`)."""

    # data-dependent selection and the in-place rotary views do not trace: stays eager under `compile: true`
    supports_compile = False

    def __init__(
        self,
        config,
        layer_number: int = 1,
        *,
        seq_length: int,
        pos_emb: str = "rotary",
        rotary_pct: float = 1.0,
        rotary_emb_base: float = 10000.0,
        attention_dropout: float = 0.0,
        block_size: int = 0,
        **stack_kwargs,
    ):
        super().__init__(config, layer_number, **stack_kwargs)
        if attention_dropout or config.attention_dropout:
            raise ValueError(
                f"{type(self).__name__}: attention_dropout {attention_dropout or config.attention_dropout} is not "
                f"supported by sparse attention layers; set attention_dropout: 0"
            )
        h, heads = config.hidden_size, config.num_attention_heads
        self.head_dim = h // heads
        self.local_heads = heads // tp_size()
        self.block_size = block_size
        self.qkv = ColumnLinear(
            h, 3 * h, config=config, init_method=config.init_method, bias=config.add_bias_linear,
            gather_output=False,
        )
        self.out = RowLinear(
            h, h, config=config, init_method=config.output_layer_init_method, bias=config.add_bias_linear,
            input_is_parallel=True, skip_bias_add=False,
        )
        rot_dim = int(self.head_dim * rotary_pct) // 2 * 2 if pos_emb == "rotary" else 0
        self.rotary = Rotary(rot_dim, rotary_emb_base)
        # the layer's random stream: a seed drawn like a weight (same on every rank of a replica), a counter
        self.selection_seed = int(torch.randint(0, 2**62, (1,), device="cpu"))
        self.draws = 0
        self._stat_sums: dict[str, torch.Tensor] = {}
        self._stat_count = 0
        self.aux_scale = 1.0  # the factor DeepSpeed applies to the LM loss (set_aux_loss_scale)

    def get_extra_state(self):
        return {"selection_seed": self.selection_seed, "draws": self.draws}

    def set_extra_state(self, state):
        self.selection_seed, self.draws = int(state["selection_seed"]), int(state["draws"])

    def generator(self, device) -> torch.Generator:
        """This forward's generator: in training it changes with the draw counter and the DP rank; in
        evaluation it is fixed."""
        if self.training:
            seed = mix_seed(self.selection_seed, self.draws, dp_rank())
        else:
            seed = mix_seed(self.selection_seed, -1, -1)
        return torch.Generator(device=device).manual_seed(seed)

    # -- what subclasses define
    def selector_params(self):
        return None, None

    def chooser(self, hidden_states, token_ids):
        """callable(scores [B, L] or None) -> bool mask [B, L] of the query positions to attend from."""
        raise NotImplementedError

    def after_selection(self, scores, L: int, advancing: bool):
        """(aux loss or None, extra statistics) once the scores are known."""
        return None, {}

    def scores(self, hidden_states):
        w, b = self.selector_params()
        return torch.sigmoid(score_logits(hidden_states, w, b)) if w is not None else None

    def select(self, hidden_states, token_ids=None):
        """The positions this forward would attend from, without attending (for inspection): mask [B, L]."""
        with torch.no_grad():
            return self.chooser(hidden_states, token_ids)(self.scores(hidden_states))

    def forward(self, hidden_states, attention_mask=None, token_ids=None, **ignored):
        L, B, _ = hidden_states.shape
        advancing = self.training and torch.is_grad_enabled()
        sel_w, sel_b = self.selector_params()
        block, chunk = tile_sizes(self.block_size, B, self.local_heads, L)
        o, scores, pos = SelectedQueryAttention.apply(
            copy_to_tp(hidden_states), self.qkv.weight, self.qkv.bias, sel_w, sel_b,
            self.chooser(hidden_states, token_ids), tp_rank() == 0, self.local_heads, self.head_dim,
            self.rotary.inv_freq, self.rotary.dim, block, chunk,
        )
        rows, _ = self.out(o)  # [k, B, h]
        idx = pos.clamp(min=0)
        weight = (pos >= 0).to(rows.dtype)
        if sel_w is not None:
            weight = weight * scores.gather(1, idx).to(rows.dtype)
        rows = rows * weight.t()[..., None]
        h = rows.shape[-1]
        y = rows.new_zeros(B, L, h).scatter_add_(1, idx[..., None].expand(-1, -1, h), rows.transpose(0, 1))
        y = y.transpose(0, 1)
        aux, extra = self.after_selection(scores if sel_w is not None else None, L, advancing)
        if aux is not None and torch.is_grad_enabled():
            y = AuxLossInjector.apply(y, aux, self.aux_scale)
        if advancing:
            fraction = (pos >= 0).sum() / (B * L)
            self._record(selected_fraction=fraction, **({"aux_loss": aux} if aux is not None else {}), **extra)
            self.draws += 1
        return y, None

    # -- decoding: a KV cache of every position, and what the selection rule needs (subclasses)
    def initial_state(self, batch: int, dtype=torch.float32, device=None) -> dict:
        z = torch.zeros(batch, self.local_heads, 0, self.head_dim, dtype=dtype, device=device)
        return {"k": z, "v": z.clone(), "pos": 0, "ids": torch.zeros(batch, 0, dtype=torch.long, device=device)}

    def step_weight(self, x: torch.Tensor, token_ids, state: dict) -> torch.Tensor:
        """[b] factor of this position's output: 0 where it is not selected (1, or the score, where it is),
        as the eval-mode forward decides it."""
        raise NotImplementedError

    def step(self, x: torch.Tensor, state: dict, token_ids=None):
        """One position: x [b, h] -> (y [b, h], new state); equal to forward's (eval mode) output there."""
        b, t = x.shape[0], state["pos"]
        q, k, v = F.linear(x, self.qkv.weight, self.qkv.bias).view(b, self.local_heads, 3, 1, self.head_dim).unbind(2)
        q, k = self.rotary(q, t), self.rotary(k, t)
        K, V = torch.cat([state["k"], k], 2), torch.cat([state["v"], v], 2)
        ids = state["ids"] if token_ids is None else torch.cat([state["ids"], token_ids.long()[:, None]], 1)
        new = {"k": K, "v": V, "pos": t + 1, "ids": ids}
        weight = self.step_weight(x, token_ids, new)
        o = F.scaled_dot_product_attention(q, K, V)  # [b, heads, 1, hd]
        rows, _ = self.out(o[:, :, 0].reshape(b, -1))
        return rows * weight.to(rows.dtype)[:, None], new

    def prefill_state(self, x: torch.Tensor, token_ids=None) -> dict:
        """The state after the positions of x [s, b, h], in one pass."""
        s, b, _ = x.shape
        _, k, v = F.linear(x, self.qkv.weight, self.qkv.bias).view(s, b, self.local_heads, 3, self.head_dim
                                                                    ).permute(3, 1, 2, 0, 4).unbind(0)
        ids = token_ids.long() if token_ids is not None else torch.zeros(b, 0, dtype=torch.long, device=x.device)
        return {"k": self.rotary(k), "v": v.contiguous(), "pos": s, "ids": ids}

    def _record(self, **values):
        for name, v in values.items():
            v = v.detach().float()
            self._stat_sums[name] = self._stat_sums[name] + v if name in self._stat_sums else v
        self._stat_count += 1

    def pop_stats(self) -> dict[str, tuple[float, int]]:
        """{name: (sum, count)} over the training forwards since the last call; resets."""
        out = {name: (float(v), self._stat_count) for name, v in self._stat_sums.items()}
        self._stat_sums, self._stat_count = {}, 0
        return out


class RandomSparseAttention(SparseAttention):
    def __init__(self, config, layer_number: int = 1, *, seq_length: int, p: float = 0.125, **kwargs):
        super().__init__(config, layer_number, seq_length=seq_length, **kwargs)
        self.p = p

    def chooser(self, hidden_states, token_ids):
        L, B, _ = hidden_states.shape
        g = self.generator(hidden_states.device)
        if not self.training:  # position-major draws: a prefix of the sequence gets the same positions
            return lambda scores: (torch.rand(L * B, generator=g, device=hidden_states.device) < self.p).view(L, B).t()
        return lambda scores: torch.rand(B, L, generator=g, device=hidden_states.device) < self.p

    def step_weight(self, x, token_ids, state):
        t, B = state["pos"] - 1, x.shape[0]
        u = torch.rand((t + 1) * B, generator=self.generator(x.device), device=x.device)[t * B:]
        return (u < self.p).to(x.dtype)


class ProgrammaticSparseAttention(SparseAttention):
    def __init__(self, config, layer_number: int = 1, *, seq_length: int, match: str = "token", **kwargs):
        super().__init__(config, layer_number, seq_length=seq_length, **kwargs)
        if match not in ("token", "bigram"):
            raise ValueError(f"sparse_programmatic.match: {match!r}; use 'token' or 'bigram'")
        self.match = match

    def chooser(self, hidden_states, token_ids):
        L, B, _ = hidden_states.shape
        if token_ids is None:
            raise ValueError(
                "sparse_programmatic needs the raw token ids: call the layer with token_ids=[batch, seq] (the GPT "
                "layer specs carry them from the embedding stage), or use sparse_learned / sparse_random"
            )
        if tuple(token_ids.shape) != (B, L):
            raise ValueError(f"sparse_programmatic: token_ids of shape {tuple(token_ids.shape)} for hidden states "
                             f"of {L} positions x batch {B}; pass token ids [batch, seq]")
        return lambda scores: programmatic_selection(token_ids, self.match)

    def step_weight(self, x, token_ids, state):
        if token_ids is None:
            raise ValueError("sparse_programmatic needs the raw token ids: step(x, state, token_ids=[batch])")
        return programmatic_selection(state["ids"], self.match)[:, -1].to(x.dtype)


class Selector(nn.Module):
    """The parameters of s = sigmoid(w . x + b) per position; w is replicated over tensor-parallel ranks."""

    def __init__(self, config):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, config.hidden_size, dtype=config.params_dtype))
        self.bias = nn.Parameter(torch.zeros(1, dtype=config.params_dtype))
        if config.perform_initialization:
            with torch.no_grad():
                config.init_method(self.weight)


class LearnedSparseAttention(SparseAttention):
    def __init__(self, config, layer_number: int = 1, *, seq_length: int, topk: int | None = None,
                 budget: float | None = None, noise_std: float = 0.01, aux_loss_coef: float = 1e-3,
                 train_selection: str = "topk", threshold_momentum: float = 0.99, **kwargs):
        super().__init__(config, layer_number, seq_length=seq_length, **kwargs)
        if train_selection not in ("topk", "threshold"):
            raise ValueError(f"sparse_learned.train_selection: {train_selection!r}; use 'topk' or 'threshold'")
        self.topk, self.budget = topk, budget
        self.noise_std, self.aux_loss_coef = noise_std, aux_loss_coef
        self.train_selection, self.threshold_momentum = train_selection, threshold_momentum
        self.selector = Selector(config)
        self.register_buffer("threshold", torch.tensor(0.5))
        self.register_buffer("threshold_updates", torch.tensor(0, dtype=torch.long))

    def k(self, L: int) -> int:
        return learned_k(L, self.topk, self.budget)

    def selector_params(self):
        return self.selector.weight, self.selector.bias

    def chooser(self, hidden_states, token_ids):
        L, B, _ = hidden_states.shape
        tau = self.threshold.detach().float().clone()
        if not self.training:
            return lambda s: s >= tau
        g = self.generator(hidden_states.device) if self.noise_std > 0 else None

        def choose(s):
            noisy = s + self.noise_std * torch.randn(B, L, generator=g, device=s.device) if g is not None else s
            return topk_selection(noisy, self.k(L)) if self.train_selection == "topk" else noisy >= tau

        return choose

    def step_weight(self, x, token_ids, state):
        s = torch.sigmoid(score_logits(x[None], self.selector.weight, self.selector.bias))[:, 0]  # [b]
        return torch.where(s >= self.threshold.float(), s, torch.zeros_like(s))

    def after_selection(self, scores, L, advancing):
        if not self.training:
            return None, {}
        tau = self.threshold.detach().float().clone()
        k = self.k(L)
        if advancing:  # calibrate the evaluation threshold to the budget: EMA of the k-th largest score
            kth = dp_mean(scores.detach().topk(k, dim=1).values[:, -1].mean())
            first = self.threshold_updates == 0
            new = torch.where(first, kth, self.threshold_momentum * tau + (1 - self.threshold_momentum) * kth)
            self.threshold.copy_(new)
            self.threshold_updates += 1
        aux = self.aux_loss_coef * torch.relu(scores.mean() - k / L) if self.aux_loss_coef > 0 else None
        return aux, {"threshold": tau}


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """The factor of every sparse layer's aux-loss gradient in `model`: what DeepSpeed applies to the LM
    loss before backward (1 / gradient accumulation steps x the fp16 loss scale). The trainer sets it
    before every step (the `before_step` hook of the sparse layer types)."""
    scale = float(scale)
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"aux-loss scale {scale!r}: use a finite non-negative number "
                         f"(1 / gradient_accumulation_steps x the fp16 loss scale)")
    for layer in sparse_layers(model):
        layer.aux_scale = scale


def sparse_layers(model: nn.Module) -> list[SparseAttention]:
    return [m for m in model.modules() if isinstance(m, SparseAttention)]


def collect_stats(model: nn.Module, all_ranks: bool = True) -> dict[str, float]:
    """Per sparse layer N: `sparse/layerN/selected_fraction`, and for learned layers `.../aux_loss` and
    `.../threshold`, averaged over the training forwards since the previous call (then reset).

    With `all_ranks` (default) and torch.distributed initialised this is a collective over all ranks
    (call it on every rank at the same step): layers on other pipeline stages are included and values
    are averaged over data-parallel replicas, so every rank returns the same dict.
    """
    local: dict[str, tuple[float, int]] = {}
    for layer in sparse_layers(model):
        for name, (total, count) in layer.pop_stats().items():
            local[f"sparse/layer{layer.layer_number}/{name}"] = (total, count)
    parts = [local]
    if all_ranks and torch.distributed.is_available() and torch.distributed.is_initialized():
        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, local)
    merged: dict[str, list] = {}
    for part in parts:
        for key, (total, count) in part.items():
            acc = merged.setdefault(key, [0.0, 0])
            acc[0] += total
            acc[1] += count
    return {key: total / count for key, (total, count) in sorted(merged.items()) if count}

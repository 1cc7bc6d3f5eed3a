"""The 2-layer MQAR model of Zoology's Figure 2: embedding -> [x + mixer(norm(x))] x layers -> norm -> head.

Mixers come from the registry through the single-process door (`neox_zoology.build_mixer`), so any
registered layer type, or a per-layer pattern of them, can be swept. As in the paper there is no
MLP (Zoology's Identity state mixer); attention uses its rotary embedding, and learned absolute
position embeddings are an option (`position_embeddings`) for the patterns a sweep names. The head is applied only at the labelled (query) positions, so the cost is the
mixers'.
"""
from __future__ import annotations

import torch
from torch import nn

IGNORE_INDEX = -100


def parse_pattern(pattern: str, num_layers: int) -> list[str]:
    """'baseconv+sparse_programmatic' -> one registered layer type per layer (the pattern cycles)."""
    from neox_zoology import registry

    names = [p.strip() for p in pattern.split("+") if p.strip()]
    if not names:
        raise ValueError(f"mixer pattern {pattern!r} is empty; use e.g. 'attention' or 'baseconv+sparse_programmatic'")
    out = []
    for i in range(num_layers):
        try:
            out.append(registry.canonical(names[i % len(names)]))
        except KeyError as exc:
            raise ValueError(f"mixer pattern {pattern!r}: {exc.args[0]}") from None
    return out


class MQARModel(nn.Module):
    def __init__(self, layer_types: list[str], vocab_size: int, d_model: int, seq_len: int,
                 mixer_args: dict | None = None, num_heads: int = 1, position_embeddings: bool = False):
        super().__init__()
        from neox_zoology import build_mixer, registry

        mixer_args = mixer_args or {}
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(seq_len, d_model) if position_embeddings else None
        self.norms = nn.ModuleList()
        self.mixers = nn.ModuleList()
        self.needs_ids = []
        seen: dict[str, int] = {}
        for t in layer_types:
            occurrence = seen.get(t, 0)
            seen[t] = occurrence + 1
            self.norms.append(nn.LayerNorm(d_model))
            self.mixers.append(build_mixer(t, hidden_size=d_model, seq_length=seq_len, num_attention_heads=num_heads,
                                           layer_index=occurrence, num_layers=len(layer_types),
                                           **mixer_args.get(t, {})))
            self.needs_ids.append(registry.get(t).needs_token_ids)
        self.final_norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.head.weight, std=0.02)
        if self.pos is not None:
            nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [n_queries, V] at the labelled positions and their targets [n_queries]."""
        x = self.embed(tokens)
        if self.pos is not None:
            x = x + self.pos(torch.arange(tokens.shape[1], device=tokens.device))[None]
        for norm, mixer, needs in zip(self.norms, self.mixers, self.needs_ids):
            x = x + mixer(norm(x), token_ids=tokens if needs else None)
        where = labels != IGNORE_INDEX
        return self.head(self.final_norm(x[where])), labels[where]

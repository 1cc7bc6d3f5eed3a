"""Batched sampling over an InferenceModel: greedy, temperature, top-k, top-p; stop on end-of-document."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass
class Sampling:
    temperature: float = 0.0
    """0 = greedy (argmax); otherwise logits / temperature are sampled."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = all)."""
    top_p: float = 0.0
    """Keep the smallest set of most likely tokens whose probability reaches p (0 = all)."""
    max_tokens: int = 64
    eod: int | None = None
    """A row stops after producing this token (it is kept in the output)."""
    seed: int = 0


@dataclass
class Generation:
    tokens: list[list[int]]
    """The new tokens of each prompt (without the prompt)."""
    seconds: float = 0.0
    decode_seconds: float = 0.0
    new_tokens: int = 0
    stopped: list[bool] = field(default_factory=list)
    """Per row: it produced end-of-document."""
    truncated: list[bool] = field(default_factory=list)
    """Per row: it reached the model's context limit (see InferenceModel.context_limit)."""

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """logits [b, V] with the tokens outside top-k / top-p set to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # tokens after the set reaches p (the first always stays)
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, cfg: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    if cfg.temperature <= 0:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / cfg.temperature, cfg.top_k, cfg.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model, prompts: list[list[int]], cfg: Sampling) -> Generation:
    """Continue each prompt (token ids) by up to cfg.max_tokens tokens. Prompts of different lengths are
    prefilled apart (each row's state is its own) and decoded together in one batch."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(cfg.seed)
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    rows, last, states = [], [], []
    for length, idx in groups.items():
        logits, state = model.prefill(torch.tensor([prompts[i] for i in idx]))
        rows += idx
        last.append(logits[:, -1])
        states.append((idx, state))
    out = [[] for _ in prompts]
    done = [False] * len(prompts)
    truncated = [False] * len(prompts)
    limit = getattr(model, "context_limit", None)
    if limit is not None and max(map(len, prompts)) > limit:
        raise ValueError(f"a prompt of {max(map(len, prompts))} tokens is longer than the {limit} positions this "
                         f"model can decode (its seq_length / max_position_embeddings); shorten it")
    vocab = model.vocab_size
    decode_start = time.perf_counter()
    new = 0
    logits_by_row = dict(zip(rows, torch.cat(last)))
    for n in range(cfg.max_tokens):
        for idx, state in states:
            logits = torch.stack([logits_by_row[i] for i in idx])[:, :vocab]
            tok = next_tokens(logits, cfg, generator)
            for i, t in zip(idx, tok.tolist()):
                if not done[i]:
                    out[i].append(t)
                    new += 1
                    done[i] = cfg.eod is not None and t == cfg.eod
                    full = limit is not None and len(prompts[i]) + len(out[i]) >= limit
                    if full and not done[i]:
                        done[i], truncated[i] = True, True
        if all(done) or n == cfg.max_tokens - 1:
            break
        stepped = []
        for idx, state in states:
            active = [i for i in idx if not done[i]]
            if not active:
                continue
            logits, state = model.step(torch.tensor([out[i][-1] for i in idx]), state)
            logits_by_row.update(zip(idx, logits))
            stepped.append((idx, state))
        states = stepped
    end = time.perf_counter()
    stopped = [d and not t for d, t in zip(done, truncated)]
    return Generation(tokens=out, seconds=end - start, decode_seconds=end - decode_start, new_tokens=new,
                      stopped=stopped, truncated=truncated)

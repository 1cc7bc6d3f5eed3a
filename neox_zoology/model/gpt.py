"""The GPT: one DeepSpeed LayerSpec per layer, run by the pipeline engine or as a plain module.

    EmbeddingPipe -> ZooBlock x num_layers -> FinalNormPipe -> LMHeadPipe -> loss

`layer_specs(args, config)` is the single description; `PipelineModule` partitions it over stages
(`pipe_parallel_size >= 1`) and `SequentialGPT` builds all of it in one process for the plain engine.
Tied input/output embeddings use a `TiedLayerSpec` (DeepSpeed keeps the copies on different
stages in sync). Every layer is built right after `torch.manual_seed(seed + index)`, so initial
weights do not depend on how the layers are split over stages or TP ranks.

With `lm_head_chunk_tokens: N > 0` the head layer returns a `lm_head.HeadInput` (hidden states + head
weight) instead of logits, and `token_nll` / `lm_loss` compute the loss N tokens at a time
(`model/lm_head.py`): the same call sites, the same numbers, no [tokens, vocab] logits. This holds under
both engines: the pipeline engine hands the last stage's output to its loss function unchanged.
"""
from __future__ import annotations

from functools import partial

import torch
from deepspeed.pipe import LayerSpec, TiedLayerSpec
from megatron.core import tensor_parallel
from torch import nn

from neox_zoology.model.block import ZooBlock, activation_checkpoint, build_norm
from neox_zoology.model.lm_head import HeadInput, chunked_token_nll, head_input
from neox_zoology.parallel import ColumnLinear, VocabEmbedding, copy_to_tp, tp_size


class EmbeddingPipe(nn.Module):
    """tokens [b, s] -> (hidden [s, b, h], tokens)."""

    def __init__(self, args, config):
        super().__init__()
        self.word_embeddings = VocabEmbedding(
            num_embeddings=args.padded_vocab_size, embedding_dim=args.hidden_size,
            init_method=config.init_method, config=config,
        )
        self.position_embeddings = (
            nn.Embedding(args.max_position_embeddings, args.hidden_size) if args.pos_emb == "learned" else None
        )
        if self.position_embeddings is not None:
            config.init_method(self.position_embeddings.weight)
        self.dropout = nn.Dropout(args.hidden_dropout)

    def forward(self, tokens):
        if isinstance(tokens, (tuple, list)):
            tokens = tokens[0]
        x = self.word_embeddings(tokens)  # [b, s, h]
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(torch.arange(tokens.shape[1], device=tokens.device))[None]
        return self.dropout(x.transpose(0, 1).contiguous()), tokens


class FinalNormPipe(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.norm = build_norm(args)

    def forward(self, inputs):
        x, _ = inputs
        return self.norm(x)


class LMHeadPipe(nn.Module):
    """hidden [s, b, h] -> this TP rank's vocabulary shard of the logits, [b, s, V/tp] (untied head);
    with `lm_head_chunk_tokens > 0`, a `HeadInput` for the chunked loss instead."""

    def __init__(self, args, config):
        super().__init__()
        self.proj = ColumnLinear(
            args.hidden_size, args.padded_vocab_size, config=config, init_method=config.init_method,
            bias=False, gather_output=False,
        )
        self.chunk_tokens = args.lm_head_chunk_tokens

    def forward(self, x):
        if self.chunk_tokens > 0:
            return head_input(x, self.proj.weight, self.chunk_tokens)
        logits, _ = self.proj(x)
        return logits.transpose(0, 1).contiguous()


def tied_head(embedding: EmbeddingPipe, x, chunk_tokens: int = 0):
    """The LM head that reuses the input embedding matrix (its vocab shard on this TP rank); with
    `chunk_tokens > 0`, a `HeadInput` for the chunked loss instead of logits."""
    if chunk_tokens > 0:
        return head_input(x, embedding.word_embeddings.weight, chunk_tokens)
    logits = torch.nn.functional.linear(copy_to_tp(x), embedding.word_embeddings.weight)
    return logits.transpose(0, 1).contiguous()


def layer_specs(args, config) -> list:
    tied = not args.no_weight_tying
    embed = (
        TiedLayerSpec("embed", EmbeddingPipe, args, config, tied_weight_attr="word_embeddings.weight")
        if tied else LayerSpec(EmbeddingPipe, args, config)
    )
    specs = [embed]
    for i, (occurrence, layer_type) in enumerate(args.layer_occurrences()):
        specs.append(LayerSpec(ZooBlock, args, config, i + 1, layer_type, occurrence))
    specs.append(LayerSpec(FinalNormPipe, args))
    if tied:
        chunk = args.lm_head_chunk_tokens
        head = partial(tied_head, chunk_tokens=chunk) if chunk > 0 else tied_head
        specs.append(
            TiedLayerSpec("embed", EmbeddingPipe, args, config, forward_fn=head,
                          tied_weight_attr="word_embeddings.weight")
        )
    else:
        specs.append(LayerSpec(LMHeadPipe, args, config))
    return specs


def token_nll(logits: torch.Tensor | HeadInput, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy [b, s] from vocab-parallel logits [b, s, V/tp] (no logits gather), or from
    the chunked head's `HeadInput` (`lm_head_chunk_tokens > 0`: logits only a chunk at a time)."""
    if isinstance(logits, HeadInput):
        return chunked_token_nll(logits, labels)
    if tp_size() > 1:
        return tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels)
    return torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), reduction="none"
    ).view_as(labels)


def lm_loss(logits: torch.Tensor | HeadInput, labels_and_mask) -> torch.Tensor:
    """Masked mean cross-entropy over vocab-parallel logits [b, s, V/tp] (no logits gather) or a `HeadInput`."""
    labels, loss_mask = labels_and_mask
    losses = token_nll(logits, labels)
    mask = loss_mask.float()
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)


class SequentialGPT(nn.Module):
    """All layer specs in one process (the plain engine, and meta-device dry runs)."""

    def __init__(self, args, config, seed: int | None = None):
        super().__init__()
        seed = args.seed if seed is None else seed
        self.checkpoint_layers = args.checkpoint_num_layers if args.checkpoint_activations else 0
        self.layers = nn.ModuleList()
        self._forward_fns = []
        tied: dict[str, nn.Module] = {}
        for index, spec in enumerate(layer_specs(args, config)):
            torch.manual_seed(seed + index)
            if isinstance(spec, TiedLayerSpec) and spec.key in tied:
                module = tied[spec.key]
            else:
                module = spec.build()
                if isinstance(spec, TiedLayerSpec):
                    tied[spec.key] = module
                self.layers.append(module)
            self._forward_fns.append((module, getattr(spec, "forward_fn", None)))

    def forward(self, tokens):
        x, fns, i = tokens, self._forward_fns, 0
        recompute = self.checkpoint_layers and self.training and torch.is_grad_enabled()
        while i < len(fns):
            module, fn = fns[i]
            if recompute and isinstance(module, ZooBlock):
                j = i
                while j < len(fns) and j - i < self.checkpoint_layers and isinstance(fns[j][0], ZooBlock):
                    j += 1
                x = activation_checkpoint(_run_blocks([m for m, _ in fns[i:j]]), *x)
                i = j
                continue
            x = fn(module, x) if fn is not None else module(x)
            i += 1
        return x


def _run_blocks(blocks):
    def run(*inputs):
        for block in blocks:
            inputs = block(inputs)
        return inputs

    return run

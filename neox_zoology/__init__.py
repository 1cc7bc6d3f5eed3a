"""neox_zoology: Zoology's mixers as layer types for a GPT-NeoX-style DeepSpeed + megatron-core stack."""
from __future__ import annotations

import warnings

# megatron-core announces on import that optional CUDA extensions are absent; the stack does not
# use them (apex/TE are optional accelerators here), so the notices only bury real messages.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message="full scope is deprecated")

__version__ = "0.1.0"


def build_mixer(name: str, *, hidden_size: int, seq_length: int, num_attention_heads: int = 1,
                layer_index: int = 0, batch_first: bool = True, num_layers: int = 1, **mixer_args):
    """One mixer as a plain module, no process group needed.

    `mixer_args` are the keys of the type's YAML section (e.g. `kernel_sizes=[3, -1]` for baseconv);
    `layer_index` picks the entry of per-layer cycles; `num_layers` is the depth of the model it sits in (the
    depth-scaled output inits read it). The module maps [batch, seq, hidden] to the same
    (or [seq, batch, hidden] with batch_first=False).
    """
    from neox_zoology import registry
    from neox_zoology.model.tconfig import transformer_config
    from neox_zoology.mixers.single import SingleProcessMixer

    spec = registry.get(name)
    args = registry.resolve_args(name, mixer_args)
    shape = registry.Shape(hidden_size=hidden_size, seq_length=seq_length, num_attention_heads=num_attention_heads)
    problems = spec.validate(shape, args)
    if problems:
        raise ValueError("; ".join(problems))
    config = transformer_config(hidden_size=hidden_size, num_attention_heads=num_attention_heads, num_layers=num_layers)
    mixer = spec.module(config, layer_index + 1, seq_length=seq_length, **spec.per_layer(args, layer_index))
    return SingleProcessMixer(mixer, batch_first=batch_first)

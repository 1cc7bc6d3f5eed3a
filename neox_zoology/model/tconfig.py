"""megatron-core TransformerConfig from our arguments, and NeoX's init methods."""
from __future__ import annotations

import math

import torch
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import init_method_normal, scaled_init_method_normal

INIT_METHODS = ("normal", "scaled_normal", "small_init", "wang_init", "single_residual_scaled_normal")


def init_method(name: str, hidden_size: int, num_layers: int, std: float):
    """GPT-NeoX's init methods by name."""
    if name == "normal":
        return init_method_normal(std)
    if name == "scaled_normal":
        return scaled_init_method_normal(std, num_layers)
    if name == "single_residual_scaled_normal":  # std / sqrt(L): one residual branch per layer (GPT-NeoX's Mamba)
        return init_method_normal(std / math.sqrt(num_layers))
    if name == "small_init":  # Nguyen & Salazar: sqrt(2 / (5 d))
        return init_method_normal(math.sqrt(2.0 / (5.0 * hidden_size)))
    if name == "wang_init":  # 2 / (L sqrt(d))
        return init_method_normal(2.0 / (num_layers * math.sqrt(hidden_size)))
    raise ValueError(f"unknown init method {name!r}; use one of {', '.join(INIT_METHODS)}")


def transformer_config(
    *,
    hidden_size: int,
    num_attention_heads: int = 1,
    num_layers: int = 1,
    ffn_hidden_size: int | None = None,
    tp: int = 1,
    params_dtype: torch.dtype = torch.float32,
    init: str = "normal",
    output_init: str = "scaled_normal",
    init_method_std: float = 0.02,
    attention_dropout: float = 0.0,
    hidden_dropout: float = 0.0,
    add_bias_linear: bool = True,
    perform_initialization: bool = True,
) -> TransformerConfig:
    return TransformerConfig(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        ffn_hidden_size=ffn_hidden_size or 4 * hidden_size,
        tensor_model_parallel_size=tp,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        init_method=init_method(init, hidden_size, num_layers, init_method_std),
        output_layer_init_method=init_method(output_init, hidden_size, num_layers, init_method_std),
        init_method_std=init_method_std,
        attention_dropout=attention_dropout,
        hidden_dropout=hidden_dropout,
        add_bias_linear=add_bias_linear,
        use_cpu_initialization=True,  # full-size draw then split: initial weights independent of TP
        perform_initialization=perform_initialization,
        gradient_accumulation_fusion=False,
    )

"""GPT-NeoX's keys this stack does not take as its own: accepted and ignored (no effect here), accepted
only at their GPT-NeoX default, refused with the reason and the fix; and GPT-NeoX layer types that mean
a different model. docs/config-keys.md lists them for the user."""
from __future__ import annotations

from neox_zoology import registry
from neox_zoology.config.schema import normalize_key, show_value

# GPT-NeoX keys accepted for compatibility that change nothing in this stack (kernel-fusion switches,
# launcher/logging settings handled elsewhere, features of other model families). Logged once.
NEOX_NO_EFFECT = {
    "scaled_upper_triang_masked_softmax_fusion", "scaled_masked_softmax_fusion",
    "bias_dropout_fusion", "rope_fusion", "layernorm_fusion", "rmsnorm_fusion", "use_flashattn_swiglu",
    "use_bnb_optimizer",
    "partition_activations", "synchronize_each_layer", "contiguous_checkpointing",
    "checkpoint_in_cpu", "wall_clock_breakdown",
    "distributed_backend", "hostfile", "include", "exclude", "num_gpus", "num_nodes", "master_port",
    "master_addr", "launcher", "deepspeed_mpi", "deepspeed_slurm", "data_impl", "num_workers",
    "mmap_warmup", "checkpoint_validation_with_forward_pass", "use_wandb", "wandb_project",
    "wandb_group", "wandb_team", "wandb_host", "wandb_init_all_ranks", "git_hash", "log_grad_norm",
    "log_grad_pct_zeros", "log_param_norm", "log_optimizer_states", "log_gradient_noise_scale",
    "gradient_noise_scale_n_batches", "gradient_noise_scale_cpu_offload", "dump_state",
    "memory_profiling", "memory_profiling_path", "profile", "profile_step_start", "profile_step_stop",
    "short_seq_prob", "sparsity_config", "opt_pos_emb_offset",
    "apply_query_key_layer_scaling", "attention_softmax_in_fp32", "rpe_num_buckets", "rpe_max_distance",
    "gmlp_attn_dim", "adlr_autoresume", "adlr_autoresume_interval", "onnx_safe", "comment",
    "no_save_optim", "no_save_rng", "zero_stage",
    "zero_reduce_scatter", "zero_contiguous_gradients", "zero_reduce_bucket_size",
    "zero_allgather_bucket_size", "amp", "autotuning", "flops_profiler", "comms_logger",
    "sequence_parallel", "curriculum_learning", "loss_scale", "loss_scale_window",
    "hysteresis", "min_loss_scale", "initial_loss_scale", "prescale_gradients", "gradient_predivide_factor",
    "tensorboard", "wandb", "csv_monitor", "elasticity", "data_efficiency", "weight_by_num_documents",
    "weighted_sampler_alpha", "global_num_gpus", "use_comet", "comet_workspace", "comet_project",
    "comet_experiment_name", "comet_tags", "comet_others", "wandb_run_name", "log_gradient_noise_scale",
    # text generation (GPT-NeoX's generate.py), not training
    "text_gen_type", "maximum_tokens", "prompt_end", "temperature", "top_p", "top_k", "recompute",
    "sample_input_file", "sample_output_file", "num_samples",
}


def _off(v) -> bool:
    """A DeepSpeed feature section that is absent or disabled."""
    return not v or (isinstance(v, dict) and v.get("enabled") is False)


# GPT-NeoX keys that have no effect here only at their GPT-NeoX default; any other value would change the
# numbers, so it is refused with the reason.
NEOX_NO_EFFECT_ONLY_AT_DEFAULT = {
    "weight_by_num_documents": (lambda v: v in (None, False),
                                "weighting datasets by document count is not implemented; give train_data_weights"),
    "prescale_gradients": (lambda v: v in (None, False), "DeepSpeed's gradient prescaling is not passed on here"),
    "gradient_predivide_factor": (lambda v: v is None or (not isinstance(v, bool) and v == 1),
                                  "DeepSpeed's gradient pre-division is not passed on here"),
    "opt_pos_emb_offset": (lambda v: v is None or (not isinstance(v, bool) and v == 0),
                           "OPT's learned-position offset is not implemented"),
    "curriculum_learning": (_off, "DeepSpeed's curriculum learning is not implemented here"),
    "data_efficiency": (_off, "DeepSpeed's data efficiency sampling is not implemented here"),
    "amp": (_off, "apex AMP is not implemented here (use bf16)"),
    "elasticity": (_off, "DeepSpeed's elastic batch sizing is not implemented here"),
    "autotuning": (_off, "DeepSpeed's autotuning is not implemented here"),
    "use_bnb_optimizer": (lambda v: v in (None, False),
                          "bitsandbytes' 8-bit Adam is not implemented here (its states are quantised, so the "
                          "steps differ from 32-bit Adam); set it to false"),
    "sparsity_config": (lambda v: not v,
                        "DeepSpeed's block-sparse attention (triton, CUDA only) is not implemented here; remove "
                        "it (for a sliding window use sliding_window_width)"),
}

# GPT-NeoX keys of features this stack does not build, with the reason and what to do (one refusal per key).
_DS_LOGGING = frozenset({"comms_logger", "flops_profiler", "wall_clock_breakdown", "tensorboard", "wandb",
                         "csv_monitor", "steps_per_print", "dump_state"})
_MOE = "mixture-of-experts layers are not implemented here; remove the moe_* keys for a dense model"
_TE = "Transformer Engine layers are not implemented here; remove the te_* keys (the plain layers compute the same)"
NEOX_REFUSED = {
    **{k: _MOE for k in ("moe_num_experts", "moe_type", "moe_top_k", "moe_router_type", "moe_lbl_in_fp32",
                         "moe_jitter_eps", "moe_aux_loss_coeff", "moe_z_loss_coeff", "moe_min_capacity",
                         "moe_token_dropping", "moe_train_capacity_factor", "moe_eval_capacity_factor",
                         "enable_expert_tensor_parallelism", "moe_expert_parallel_size", "moe_use_residual",
                         "moe_glu", "moe_ffn_hidden_size")},
    **{k: _TE for k in ("te_columnparallel", "te_rowparallel", "te_layernorm_mlp", "te_mha", "te_fp8_format",
                        "te_fp8_wgrad", "te_fp8_amax_history_len", "te_fp8_amax_compute_algo", "te_fp8_margin",
                        "te_fp8_mha", "te_fp8_use_cached_weights")},
    "expansion_factor": "GPT-NeoX's expansion_factor is not implemented here; give intermediate_size instead",
    "use_qk_layernorm": "query/key LayerNorm is not implemented here; remove it (or set false)",
    "deepspeed_extra_args": "extra DeepSpeed settings are not passed on here (only its logging sections are "
                            "accepted: " + ", ".join(sorted(_DS_LOGGING)) + "); move each into its own key, or "
                            "remove them",
    "soft_prompt_tuning": "soft-prompt tuning is not implemented here; remove it",
    "scalenorm_epsilon": "ScaleNorm is not implemented here; remove it",
    "output_layer_init_method_std": "remove it; init_method_std applies to every layer",
}

# Layer-type names of GPT-NeoX's attention_config that mean a different model than any type here.
NEOX_LAYER_TYPES = {
    "local": "GPT-NeoX's local is DeepSpeed's block-sparse local attention (sparsity_config), not implemented "
             "here; for a sliding window write sliding_window (or attention with sliding_window_width)",
    **{t: "DeepSpeed's block-sparse attention (sparsity_config) is not implemented here; use global or flash"
       for t in ("sparse_fixed", "sparse_variable", "bigbird", "bslongformer")},
    "gmlp": "gMLP blocks are not implemented here", "amlp": "aMLP blocks are not implemented here",
}

# NeoX values that mean the same as ours.
NEOX_PARTITION_DEFAULTS = {"type:transformer", "type:transformer|mlp", "type:ParallelTransformerLayerPipe"}


def neox_inert(key: str, value, raw: dict) -> bool:
    """A refused GPT-NeoX feature key whose value switches the feature off (so it changes nothing)."""
    if key.startswith("moe_") or key == "enable_expert_tensor_parallelism":
        return raw.get("moe_num_experts") in (None, 1) and (key != "moe_num_experts" or value in (None, 1))
    if key == "deepspeed_extra_args" and isinstance(value, dict):
        return set(map(normalize_key, value)) <= _DS_LOGGING
    return value is None or value is False or value == {} or value == []


# GPT-NeoX's mamba_* keys. The kernel switches choose CUDA kernels for the same math: accepted, no effect.
NEOX_MAMBA_FUSION = ("mamba_selective_scan_fusion", "mamba_causal_conv_fusion", "mamba_inner_func_fusion")


def neox_mamba_keys(raw: dict, where, ignored: list) -> list[str]:
    """Moves GPT-NeoX's mamba_* keys out of `raw`: bias switches into the layer type's section, kernel switches and
    mamba_selective_fp32_params (where it changes nothing) into `ignored`; returns the problems. A config with
    GPT-NeoX's `<name>_*` keys of a layer type with `MixerSpec.neox_defaults` means GPT-NeoX's version of it: its
    section gets those values where it leaves them unset (Mamba: projection_init init_method, GPT-NeoX's init)."""
    problems = []
    neox_style = {name for name in registry.names() if any(key.startswith(f"{name}_") for key in raw)}
    for key in NEOX_MAMBA_FUSION:
        if key in raw:
            value = raw.pop(key)
            if isinstance(value, bool):
                ignored.append(key)
            else:
                problems.append(f"{where(key)}: {key}: {show_value(value)}; use true or false (a kernel choice, no effect)")
    for name in registry.names():  # bias switches: keys of a layer type's section (MixerSpec.neox_keys)
        for key, targets in registry.get(name).neox_keys.items():
            if key not in raw:
                continue
            value, section = raw.pop(key), raw.get(name)
            if not isinstance(value, bool):
                problems.append(f"{where(key)}: {key}: {show_value(value)}; use true or false")
                continue
            section = {} if section is None else section
            if not isinstance(section, dict):
                continue  # the section's own error is reported where it is read
            clash = [t for t in targets if t in section and section[t] != value]
            if clash:
                problems.append(f"{where(key)}: {key}: {show_value(value)} contradicts {name}.{clash[0]}: "
                                f"{show_value(section[clash[0]])}; keep one")
            raw[name] = {**section, **{t: value for t in targets}}
    if "mamba_selective_fp32_params" in raw:
        key, value = "mamba_selective_fp32_params", raw.pop("mamba_selective_fp32_params")
        half = raw.get("precision") in ("fp16", "bfloat16") or any(
            isinstance(raw.get(k), dict) and raw[k].get("enabled") for k in ("fp16", "bf16"))
        if not isinstance(value, bool):
            problems.append(f"{where(key)}: {key}: {show_value(value)}; use true or false")
        elif value and half:
            problems.append(f"{where(key)}: {key}: true; keeping A_log and D in fp32 while DeepSpeed casts the model "
                            f"to fp16/bf16 is not implemented here; set it to false (they are then stored in the "
                            f"run's precision, the scan still computes in fp32) or train in fp32")
        else:
            ignored.append(key)  # false, or an fp32 run: every parameter is fp32 anyway
    for name in sorted(neox_style):
        section, defaults = raw.get(name), registry.get(name).neox_defaults
        if defaults and (section is None or isinstance(section, dict)):
            raw[name] = {**defaults, **(section or {})}
    return problems

"""The nested sections of a config (`optimizer`, `zero_optimization`, `fp16`, `bf16`, `data_types`,
`ar_eval`): each a `Section` table of rules with its defaults."""
from __future__ import annotations

from neox_zoology.config.schema import Rule, Section


def _even(n: int) -> str | None:
    # DeepSpeed's ZeRO 1/2 asserts a multiple of its 2-element (4-byte) allgather alignment.
    return None if n % 2 == 0 else "use an even number of elements (DeepSpeed's ZeRO aligns allgathers to 2)"

_OFFLOAD_WHY = ("ZeRO-Offload steps DeepSpeed's CPU Adam in place of this stack's torch AdamW, and DeepSpeed "
                "refuses the pair; remove the key or turn it off")


def _no_offload(section: dict) -> str | None:
    device = section.get("device", "none")
    return None if device in ("none", None) else _OFFLOAD_WHY


OPTIMIZER_PARAMS = Section(
    "optimizer.params",
    {
        "lr": Rule("float", gt=0, required=True, hint="the peak learning rate"),
        "betas": Rule("list", length=2, items=Rule("float", ge=0, lt=1), default=[0.9, 0.999]),
        "eps": Rule("float", gt=0, default=1e-8),
        # FusedAdam arguments GPT-NeoX passes through; accepted at the value this stack computes.
        "adam_w_mode": Rule("bool", only=True, hint="weight decay is decoupled (AdamW), as GPT-NeoX's default"),
        "bias_correction": Rule("bool", only=True, hint="Adam's bias correction is always applied"),
        "amsgrad": Rule("bool", only=False, hint="GPT-NeoX's FusedAdam has no AMSGrad either"),
    },
    example="{lr: 6.0e-4, betas: [0.9, 0.95], eps: 1.0e-8}",
    refused={
        "weight_decay": "GPT-NeoX takes weight decay only from the top-level key weight_decay (it passes that "
                        "to the optimizer beside these params, which refuses a second one); set weight_decay "
                        "there and remove this one",
    },
)
OPTIMIZER = Section(
    "optimizer",
    {
        "type": Rule("str", choices=("Adam", "AdamW"), casefold=True, default="Adam",
                     hint="both are Adam with decoupled weight decay, GPT-NeoX's Adam"),
        "params": Rule("dict", section=OPTIMIZER_PARAMS, required=True),
    },
    example="{type: Adam, params: {lr: 6.0e-4, betas: [0.9, 0.95], eps: 1.0e-8}}",
)
_STAGE3 = ("sub_group_size", "prefetch_bucket_size", "param_persistence_threshold", "model_persistence_threshold",
           "max_live_parameters", "max_reuse_distance", "gather_16bit_weights_on_model_save",
           "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "stage3_model_persistence_threshold",
           "stage3_max_live_parameters", "stage3_max_reuse_distance", "stage3_gather_16bit_weights_on_model_save",
           "stage3_gather_fp16_weights_on_model_save")
ZERO = Section(
    "zero_optimization",
    {
        "stage": Rule("int", ge=0, le=2, default=0,
                      hint="ZeRO-3 is not supported; tensor and pipeline parallelism split the parameters"),
        "allgather_partitions": Rule("bool"),
        "allgather_bucket_size": Rule("int", gt=0, parse=_even),
        "overlap_comm": Rule("bool"),
        "reduce_scatter": Rule("bool"),
        "reduce_bucket_size": Rule("int", gt=0),
        "contiguous_gradients": Rule("bool"),
        "round_robin_gradients": Rule("bool"),
        "load_from_fp32_weights": Rule("bool"),
        "cpu_offload": Rule("bool", only=False, hint=_OFFLOAD_WHY),
        "offload_optimizer": Rule("dict", null=True, parse=_no_offload),
        "offload_param": Rule("dict", null=True, parse=_no_offload),
    },
    example="{stage: 1, overlap_comm: true, contiguous_gradients: true}",
    refused={**{k: "a ZeRO stage-3 setting; this stack supports stages 0-2" for k in _STAGE3},
             "cpu_offload_param": _OFFLOAD_WHY, "cpu_offload_use_pin_memory": _OFFLOAD_WHY},
    # DeepSpeed refuses its deprecated cpu_offload beside offload_optimizer, even when false
    not_forwarded=frozenset({"cpu_offload"}),
)
FP16 = Section(
    "fp16",
    {
        "enabled": Rule("bool", default=False),
        "auto_cast": Rule("bool"),
        "loss_scale": Rule("float", ge=0, hint="0 = dynamic loss scaling"),
        "initial_scale_power": Rule("int", ge=0, le=64),
        "loss_scale_window": Rule("int", gt=0),
        "hysteresis": Rule("int", gt=0),
        "consecutive_hysteresis": Rule("bool"),
        "min_loss_scale": Rule("int", gt=0),
        "fp16": Rule("bool", hint="GPT-NeoX's own marker"),
        "type": Rule("str", choices=("fp16", "bfloat16"),
                     hint="GPT-NeoX's own marker; bfloat16 with enabled: true means bf16"),
    },
    example="{enabled: true, loss_scale: 0, loss_scale_window: 1000, hysteresis: 2, min_loss_scale: 1}",
    refused={"fp16_master_weights_and_grads": "needs DeepSpeed's CPU Adam; this stack steps a torch AdamW"},
    not_forwarded=frozenset({"fp16", "type"}),
)
DATA_TYPES = Section(
    "data_types",
    {"grad_accum_dtype": Rule("str", choices=("fp32", "bf16", "fp16"),
                              hint="the dtype DeepSpeed accumulates gradients in")},
    example="{grad_accum_dtype: fp32}",
)
BF16 = Section(
    "bf16",
    {
        "enabled": Rule("bool", default=False),
        "immediate_grad_update": Rule("bool"),
        "check_grad_overflow": Rule("bool"),
    },
    example="{enabled: true}",
)
AR_EVAL = Section(
    "ar_eval",
    {
        "enabled": Rule("bool", default=False),
        "iters": Rule("int", gt=0, default=10, hint="global validation batches per evaluation"),
        "threshold": Rule("int", ge=0, default=1250,
                          hint="an AR hit's bigram occurred at most this many times in training"),
        "bigram_counts": Rule("str", null=True, default=None, hint=".npz of training bigram counts"),
        "reference": Rule("str", null=True, default=None,
                          hint="ar_slice.json or run directory of an attention run, for gap attribution"),
        "strict": Rule("bool", default=False, hint="true: a failure inside the evaluation stops training"),
        "timeout": Rule("float", gt=0, null=True, default=1800.0,
                        hint="seconds; the evaluation stops early (results marked truncated) after this"),
    },
    example="{enabled: true, bigram_counts: data/bigrams.npz}",
)
AR_EVAL_DEFAULTS = AR_EVAL.normalized()

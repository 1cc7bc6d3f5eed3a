"""Model + optimizer + LR schedule + DeepSpeed engine, configured from `Args`."""
from __future__ import annotations

import math

import torch

from neox_zoology.mixers.base import NO_WEIGHT_DECAY
from neox_zoology.model.block import ZooBlock
from neox_zoology.model.gpt import SequentialGPT, layer_specs, lm_loss
from neox_zoology.model.tconfig import transformer_config

def is_pipe(engine) -> bool:
    """The engine is DeepSpeed's PipelineEngine (pipe_parallel_size >= 1): it steps whole batches itself."""
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return isinstance(engine, PipelineEngine)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def model_config(args, perform_initialization: bool = True):
    return transformer_config(
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_layers=args.num_layers,
        ffn_hidden_size=args.ffn_hidden_size,
        tp=args.tp,
        params_dtype=torch.float32,  # master weights; DeepSpeed casts for bf16/fp16
        init=args.init_method,
        output_init=args.output_layer_init_method,
        init_method_std=args.init_method_std,
        attention_dropout=args.attention_dropout,
        hidden_dropout=args.hidden_dropout,
        add_bias_linear=args.use_bias_in_attn_linear,
        perform_initialization=perform_initialization,
    )


def lr_factor(args, step: int) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warm-up, then decay to min_lr."""
    decay_iters = max(1, args.lr_decay_iters)
    warmup = int(args.warmup * decay_iters)
    lr, min_lr = args.lr, args.min_lr
    if step < warmup:
        return (step + 1) / warmup
    if args.lr_decay_style == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, decay_iters - warmup))
    if args.lr_decay_style == "linear":
        value = lr - (lr - min_lr) * progress
    else:
        value = min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    return value / lr


def param_groups(model: torch.nn.Module, weight_decay: float):
    """Weight decay on matrices only: not on biases, norms, 1-d parameters, or the parameters of long
    filters and SSM kernels (marked by `mixers.base.exclude_from_weight_decay`)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and not getattr(p, NO_WEIGHT_DECAY, False) else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def global_grad_norm(params) -> torch.Tensor:
    """2-norm of the gradients of the whole model across TP and pipeline ranks: a tensor-parallel shard counts
    on every TP rank, a replicated parameter on TP rank 0 only, a tied copy on another pipeline stage
    (`ds_pipe_replicated`) not at all. Data-parallel replicas hold the same reduced gradients."""
    from megatron.core import parallel_state

    from neox_zoology.parallel import tp_rank

    first = tp_rank() == 0
    sq = None
    for p in params:
        if p.grad is None or getattr(p, "ds_pipe_replicated", False):
            continue
        if getattr(p, "tensor_model_parallel", False) or first:
            term = p.grad.detach().float().pow(2).sum()
            sq = term if sq is None else sq + term
    if sq is None:
        sq = torch.zeros((), device=next(iter(params)).device if params else "cpu")
    if torch.distributed.is_available() and torch.distributed.is_initialized() and \
            parallel_state.model_parallel_is_initialized():
        torch.distributed.all_reduce(sq, group=parallel_state.get_model_parallel_group())
    return sq.sqrt()


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips a step whose gradients are not all finite on some rank; every rank agrees.

    DeepSpeed calls `step` on every rank at the same point (after the data-parallel reduction), so the
    all-reduce of the verdict is safe there. The loop reads and resets `last_skipped`. (Under ZeRO,
    DeepSpeed's own optimizer wrapper finds non-finite gradients first and skips the step itself.)
    With `clip_norm` set (fp32 without ZeRO, where DeepSpeed runs this optimizer unwrapped and keeps no
    norm), `step` also computes the global gradient norm before clipping, stores it as `_global_grad_norm`
    (which DeepSpeed's engine reports) and clips as DeepSpeed does: grads x max_norm / (norm + 1e-6).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.last_skipped = False
        self.clip_norm = None

    def grads_finite(self) -> bool:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norms = torch._foreach_norm(grads) if grads else []
        if grads:
            bad = torch.stack([~torch.isfinite(n) for n in norms]).any().float()
        else:
            bad = torch.zeros((), device=self.param_groups[0]["params"][0].device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        return not bool(bad)

    @torch.no_grad()
    def step(self, closure=None):
        if self.clip_norm is not None:
            params = [p for g in self.param_groups for p in g["params"]]
            norm = global_grad_norm(params)
            self._global_grad_norm = float(norm)
            if self.clip_norm > 0 and torch.isfinite(norm):
                coef = self.clip_norm / (float(norm) + 1e-6)
                if coef < 1:
                    for p in params:
                        if p.grad is not None:
                            p.grad.mul_(coef)
        self.last_skipped = not self.grads_finite()
        return None if self.last_skipped else super().step(closure)


def make_optimizer(args, model):
    """GPT-NeoX's `Adam` (FusedAdam in adam_w_mode: Adam with decoupled weight decay, i.e. torch's AdamW):
    lr, betas and eps from `optimizer.params`, weight decay from the top-level `weight_decay`, as GPT-NeoX
    passes them (`config.OPTIMIZER_PARAMS` validates the params and fills their defaults)."""
    params = args.optimizer["params"]
    kwargs = dict(lr=params["lr"], betas=tuple(params["betas"]), eps=params["eps"])
    if torch.cuda.is_available():
        kwargs["fused"] = True
    opt = GuardedAdamW(param_groups(model, args.weight_decay), **kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(args, step))
    return opt, sched


def optimizer_clips(args) -> bool:
    """fp32 without ZeRO: DeepSpeed steps our optimizer unwrapped and would clip without keeping the norm,
    so the optimizer computes the norm and clips itself."""
    return args.dtype_name == "fp32" and args.zero_optimization["stage"] == 0


def deepspeed_config(args) -> dict:
    """DeepSpeed's config from the validated sections (`config.ZERO`, `FP16`, `BF16`); precision is the one
    `args.dtype_name` resolves from the sections and GPT-NeoX's `precision` shorthand."""
    from neox_zoology.config import BF16, FP16, ZERO

    dtype = args.dtype_name
    return {
        "train_micro_batch_size_per_gpu": args.train_micro_batch_size_per_gpu,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "train_batch_size": args.global_batch,
        # unwrapped optimizer (fp32, ZeRO 0): GuardedAdamW clips and keeps the norm (see optimizer_clips)
        "gradient_clipping": 0.0 if optimizer_clips(args) else args.gradient_clipping,
        "zero_optimization": ZERO.for_deepspeed(args.zero_optimization),
        "zero_allow_untested_optimizer": True,  # a torch AdamW: no JIT-compiled FusedAdam
        "bf16": {**BF16.for_deepspeed(args.bf16), "enabled": dtype == "bf16"},
        "fp16": {**FP16.for_deepspeed(args.fp16), "enabled": dtype == "fp16"},
        **({"data_types": dict(args.data_types)} if args.data_types else {}),
        **({"communication_data_type": "fp32"} if args.fp32_allreduce and dtype != "fp32" else {}),
        "steps_per_print": args.steps_per_print if args.steps_per_print > 0 else 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(args, topology):
    """The DeepSpeed engine: PipelineEngine when pipe_parallel_size >= 1, the plain engine otherwise."""
    import deepspeed
    from deepspeed.pipe import PipelineModule

    from neox_zoology.parallel.setup import MPU

    from neox_zoology.parallel.tp import set_fp32_allreduce

    set_fp32_allreduce(args.fp32_allreduce and args.dtype_name != "fp32")
    config = model_config(args)
    if args.pipe_parallel_size >= 1:
        model = PipelineModule(
            layers=layer_specs(args, config),
            loss_fn=lm_loss,
            topology=topology,
            partition_method=args.pipe_partition_method,
            seed_layers=True,
            seed_fn=torch.manual_seed,
            base_seed=args.seed,
            # Checkpointing is done per block by ZooBlock itself (below), not by DeepSpeed's interval
            # mechanism, which reseeds every layer of a checkpointed group with the group's first seed.
            activation_checkpoint_interval=0,
        )
        for block in model.modules():
            if isinstance(block, ZooBlock):
                block.recompute = args.checkpoint_activations
        mpu = None  # the topology carries the groups
    else:
        model = SequentialGPT(args, config)
        mpu = MPU()
    if torch.cuda.is_available():
        model = model.cuda()
    opt, sched = make_optimizer(args, model)
    if optimizer_clips(args):
        opt.clip_norm = args.gradient_clipping
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=deepspeed_config(args), mpu=mpu,
    )
    engine.zoo_optimizer = opt  # DeepSpeed may wrap it (bf16); the loop reads its skip counters
    return engine

"""The training loop, top to bottom: set up, resume, step, log, evaluate, save."""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence

import torch

from neox_zoology import flops, registry
from neox_zoology.data import BatchIterator, build_datasets, to_device
from neox_zoology.model.gpt import lm_loss
from neox_zoology.tokenizer import load_tokenizer, resolve_vocab
from neox_zoology.parallel import setup as psetup
from neox_zoology.parallel.cpu_compat import model_parallel_seed
from neox_zoology.training import checkpoint
from neox_zoology.training.engine import build_engine, is_pipe
from neox_zoology.training.metrics import Logger, Throughput


def preflight(args, launch: bool):
    """What can be checked from the files before any process starts: the tokenizer loads (a launch needs
    one; a dry run loads it when vocab_file is set), the vocabulary resolves, the resume rules hold
    (checkpoint.resume_plan) and, for a launch, every dataset was made with this tokenizer. Returns
    (tokenizer or None, the resume plan); raises ConfigError."""
    from neox_zoology.data import check_data_identity

    if launch:
        from neox_zoology.config import check_launch

        check_launch(args)
    has_file = bool(args.vocab_file) and os.path.exists(args.vocab_file)  # check_paths noted a missing one
    tokenizer = load_tokenizer(args) if launch or has_file else None
    resolve_vocab(args, tokenizer)
    plan = checkpoint.resume_plan(args)
    if launch:
        check_data_identity(args, tokenizer)
    return tokenizer, plan


def train_step(engine, batches, device) -> torch.Tensor:
    """One optimizer step; returns the mean loss over the global batch (same on every rank)."""
    if is_pipe(engine):
        return engine.train_batch(data_iter=batches).detach().float()
    total = torch.zeros((), device=device)
    for _ in range(engine.gradient_accumulation_steps()):
        tokens, labels = to_device(next(batches), device)
        loss = lm_loss(engine(tokens), labels)
        engine.backward(loss)
        engine.step()
        total += loss.detach().float()
    return _dp_mean(total / engine.gradient_accumulation_steps())


def eval_loss(engine, batches, iters: int, device) -> float:
    if is_pipe(engine):
        losses = [engine.eval_batch(data_iter=batches).float() for _ in range(iters)]
        return float(torch.stack(losses).mean())
    engine.eval()
    total = torch.zeros((), device=device)
    n = iters * engine.gradient_accumulation_steps()
    with torch.no_grad():
        for _ in range(n):
            tokens, labels = to_device(next(batches), device)
            total += lm_loss(engine(tokens), labels).float()
    engine.train()
    return float(_dp_mean(total / n))


EXIT_PREEMPTED = 75
"""Exit status after a preemption signal was honoured (checkpoint saved): EX_TEMPFAIL, "try again"."""


class Preemption:
    """SIGTERM / SIGUSR1 (what SLURM sends before it kills a job) set a flag; `agreed()` all-reduces it
    at a step boundary so that every rank stops after the same step."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self):
        import signal

        self.received = None
        self.previous = {}
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                try:
                    self.previous[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread: leave the handlers alone
                    pass

    def _handle(self, signum, frame):
        import signal

        self.received = signal.Signals(signum).name

    def agreed(self, device) -> bool:
        flag = torch.tensor(float(self.received is not None), device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag)

    def restore(self) -> None:
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


EXIT_NONFINITE = 3
"""Exit status after `max_nonfinite_steps` consecutive steps with non-finite gradients."""


class NonFiniteError(RuntimeError):
    pass


def loss_scale(engine, args) -> float:
    """The factor DeepSpeed applies to the LM loss before backward: 1 / accumulation steps (times the
    fp16 loss scale); what a layer's own auxiliary-loss gradients must be multiplied by too."""
    scale = 1.0 / engine.gradient_accumulation_steps()
    if args.dtype_name == "fp16":
        scale *= float(engine.optimizer.loss_scale)
    return scale


def before_step(engine, args) -> None:
    """The layer types' `before_step` hooks (every step: the fp16 loss scale moves)."""
    for hook in registry.hooks(args.layer_types, "before_step"):
        hook(engine.module, loss_scale(engine, args))


def layer_stats(engine, args) -> dict:
    """The layer types' statistics (a collective: every rank, every log step)."""
    out = {}
    for hook in registry.hooks(args.layer_types, "stats"):
        out.update(hook(engine.module))
    return out


def _dp_mean(x: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group()
    x = x.clone()
    torch.distributed.all_reduce(x, group=group)
    return x / torch.distributed.get_world_size(group)


def startup_notices(args) -> list[str]:
    """What a valid config does differently from what its keys might suggest, logged once at start-up."""
    out = []
    if args.checkpoint_activations and args.pipe_parallel_size >= 1 and args.checkpoint_num_layers > 1:
        out.append(f"pipeline engine: activation checkpointing per block (checkpoint_num_layers "
                   f"{args.checkpoint_num_layers} groups blocks only under the plain engine)")
    out += args.config_notes
    if args.ignored_keys:
        out.append(f"accepted GPT-NeoX keys with no effect here: {', '.join(sorted(set(args.ignored_keys)))}")
    for hook in registry.hooks(args.layer_types, "notices"):
        out += hook(args)
    return out


AfterSave = Callable[[int, str], object]
"""Called on every rank after each checkpoint save with (iteration, checkpoint folder)."""
AfterSaveFactory = Callable[..., AfterSave]
"""(args, engine, valid_batches, log, tokenizer=...) -> AfterSave; the `config_key` attribute names the
config section it implements (e.g. eval.hook.ArSliceHook: "ar_eval"). The entry point (train.py) wires them."""


def check_hooks(args, after_save: Sequence[AfterSaveFactory]) -> None:
    """Refuse an enabled after-checkpoint evaluation whose hook this entry point does not run."""
    from neox_zoology.config import ConfigError

    wired = {getattr(factory, "config_key", None) for factory in after_save}
    if (args.ar_eval or {}).get("enabled") and "ar_eval" not in wired:
        raise ConfigError(f"{args.sources.get('ar_eval', 'config')}: ar_eval.enabled is true but this entry point "
                          "runs no AR-slice hook; launch train.py (it wires eval.hook.ArSliceHook) or pass "
                          "after_save=(ArSliceHook,) to run()")
    if args.eval_tasks and "eval_tasks" not in wired:
        raise ConfigError(f"{args.sources.get('eval_tasks', 'config')}: eval_tasks is set but this entry point runs "
                          "no lm-eval hook; launch train.py (it wires eval.lm_tasks.LmTasksHook) or pass "
                          "after_save=(LmTasksHook,) to run()")


def run(args, summary_path: str | None = None, after_save: Sequence[AfterSaveFactory] = ()) -> dict:
    """Train per `args` (already validated). Returns a summary dict (also written to summary_path).
    `after_save`: factories of the hooks run after every checkpoint (see AfterSaveFactory)."""
    from megatron.core import parallel_state

    check_hooks(args, after_save)

    psetup.init_distributed()
    topo = psetup.init_model_parallel(args.tp, args.pp)
    rank = torch.distributed.get_rank()
    log = Logger(args, rank)
    preemption = Preemption()
    try:
        model_parallel_seed(args.seed)
        tokenizer, plan = preflight(args, launch=True)
        for notice in startup_notices(args) + plan.notices:
            log.info(notice)
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        engine = build_engine(args, topo)
        if args.save and rank == 0:
            removed = checkpoint.remove_incomplete(args.save) if os.path.isdir(args.save) else []
            if removed:
                log.info(f"removed interrupted checkpoint saves: {', '.join(removed)}")
        start = checkpoint.load(engine, args.load, args, log=log.info) if plan.tag else 0
        loaded = checkpoint.loaded_path(engine) if plan.tag else None
        if plan.tag:
            log.info(f"{'finetuning from' if args.finetune else 'resumed from'} {loaded} at iteration {start}")

        dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        eval_runs = args.train_iters // args.eval_interval + 1 if args.eval_iters > 0 else 0
        splits = build_datasets(args, tokenizer, eval_runs)
        train_batches = BatchIterator(splits.train, args.train_micro_batch_size_per_gpu,
                                      args.gradient_accumulation_steps, dp_rank, dp_size, start)

        def valid_batches():  # the same batches at every checkpoint, so that steps compare
            if splits.valid is None:
                return None
            return BatchIterator(splits.valid, args.train_micro_batch_size_per_gpu,
                                 args.gradient_accumulation_steps, dp_rank, dp_size, 0)

        hooks = [factory(args, engine, valid_batches, log, tokenizer=tokenizer) for factory in after_save]

        flops_tok = 3 * flops.model_forward_per_token(args)
        meter = Throughput(args.global_batch * args.seq_length, flops_tok, args.world_size)
        log.info(
            f"training {args.num_layers} layers {dict(sorted(Counter(args.layer_types).items()))} | "
            f"TP {args.tp} PP {args.pp} DP {args.dp} | global batch {args.global_batch} x {args.seq_length} | "
            f"{flops_tok / 1e9:.3f} GFLOP/token (fwd+bwd)"
        )
        losses, evals, last_ckpt, tput, skipped, preempted, in_a_row = [], [], None, [], [], None, 0
        last_stats = {}
        opt = engine.zoo_optimizer
        for it in range(start, args.train_iters):
            # Non-finite gradients skip the step: ZeRO's optimizer detects them itself (engine.skipped_steps),
            # otherwise GuardedAdamW does; every rank reaches the same verdict.
            opt.last_skipped, ds_skipped = False, engine.skipped_steps
            before_step(engine, args)
            loss = float(train_step(engine, train_batches, device))
            meter.tick()
            losses.append((it + 1, loss))
            step = it + 1
            if opt.last_skipped or engine.skipped_steps > ds_skipped:
                skipped.append(step)
                in_a_row += 1
                log.info(f"iter {step:>6} | skipped: non-finite gradients (loss {loss}); "
                         f"{in_a_row} in a row, {len(skipped)} in this run")
                log.scalars(step, {"skipped_steps": len(skipped)})
                if in_a_row >= args.max_nonfinite_steps:
                    raise NonFiniteError(
                        f"{in_a_row} consecutive steps (up to iteration {step}) had non-finite "
                        f"gradients (max_nonfinite_steps: {args.max_nonfinite_steps}); stopped without saving, so "
                        f"the last verified checkpoint is {checkpoint.last_verified(args, last_ckpt, loaded)}. Lower "
                        f"lr, check the data around these steps, or resume from that checkpoint"
                    )
            else:
                in_a_row = 0
            if step % args.log_interval == 0 or step == args.train_iters:
                m = meter.read()
                tput.append(m["tokens_per_s"])
                lr = engine.get_lr()[0]
                gnorm = engine.get_global_grad_norm()
                gnorm = float(gnorm) if gnorm is not None else float("nan")
                mfu = f"{100 * m['mfu']:.1f}%" if m["mfu"] is not None else "n/a"
                log.info(
                    f"iter {step:>6}/{args.train_iters} | loss {loss:.4f} | lr {lr:.3e} | grad norm {gnorm:.3f} | "
                    f"{m['tokens_per_s']:,.0f} tokens/s | {m['tflops_per_rank']:.3f} TFLOP/s/rank | MFU {mfu} | "
                    f"{m['s_per_step']:.3f} s/step"
                )
                log.scalars(step, {"loss": loss, "lr": lr, "grad_norm": gnorm, **m})
                stats = layer_stats(engine, args)  # a collective: every rank, every log step
                if stats:
                    log.info("layer stats: " + ", ".join(f"{k}={v:.4g}" for k, v in stats.items()))
                    log.scalars(step, stats)
                    last_stats = stats
                meter.reset()
            if splits.valid is not None and args.eval_iters > 0 and step % args.eval_interval == 0:
                run_idx = step // args.eval_interval - 1
                vb = BatchIterator(splits.valid, args.train_micro_batch_size_per_gpu,
                                   args.gradient_accumulation_steps, dp_rank, dp_size, run_idx * args.eval_iters)
                vloss = eval_loss(engine, vb, args.eval_iters, device)
                evals.append((step, vloss))
                log.info(f"iter {step:>6} | validation loss {vloss:.4f} | ppl {_ppl(vloss):.2f}")
                log.scalars(step, {"loss": vloss, "ppl": _ppl(vloss)}, prefix="valid")
            if preemption.agreed(device):
                preempted = step
                if args.save:
                    last_ckpt = checkpoint.save(engine, args, step)
                log.info(f"received {preemption.received or 'a preemption signal on another rank'}: stopped after "
                         f"iteration {step}" + (f", saved {last_ckpt}" if args.save else ", no `save` path set"))
                break
            if args.save and _should_save(args, step):
                last_ckpt = checkpoint.save(engine, args, step)
                log.info(f"saved checkpoint {last_ckpt}")
                for hook in hooks:  # every rank (each a no-op unless enabled; the AR slice raises only if strict)
                    hook(step, last_ckpt)
        summary = {
            "first_loss": losses[0][1] if losses else None,
            "last_loss": losses[-1][1] if losses else None,
            "losses": losses,
            "valid_losses": evals,
            "checkpoint": last_ckpt,
            "tokens_per_s": sum(tput) / len(tput) if tput else None,
            "start_iteration": start,
            "skipped_steps": skipped,
            "preempted_at": preempted,
            "layer_stats": last_stats,
        }
        if losses:
            log.info(
                f"done: first loss {summary['first_loss']:.4f}, last loss {summary['last_loss']:.4f}, "
                f"checkpoint {last_ckpt}, {summary['tokens_per_s'] or 0:,.0f} tokens/s"
            )
        if summary_path and rank == 0:
            os.makedirs(os.path.dirname(os.path.abspath(summary_path)), exist_ok=True)
            with open(summary_path, "w") as f:
                json.dump(summary, f)
        return summary
    finally:
        preemption.restore()
        log.close()
        psetup.destroy()


def _should_save(args, step: int) -> bool:
    if step == args.train_iters:
        return True
    if args.checkpoint_factor and step % args.checkpoint_factor == 0:
        return True
    return bool(args.extra_save_iters) and step in args.extra_save_iters


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))


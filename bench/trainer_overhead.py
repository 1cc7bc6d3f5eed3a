"""Time per training step: our DeepSpeed trainer vs a bare PyTorch loop, same model, same batches.

    python -m bench.trainer_overhead [--config FILE] [--steps 20] [--rounds 4] [--threads N] [--out FILE]

"Ours" is the engine from `build_engine` (ZeRO stage from the config) stepped by `train_step`, exactly
as the training loop does (including the `float(loss)` the loop logs). "Bare" is the same module
class (`SequentialGPT`, same args, same initial weights) with the same torch AdamW + LambdaLR from
`make_optimizer`, stepped by hand:

    loss = lm_loss(model(tokens), labels); loss.backward(); clip_grad_norm_; opt.step(); sched.step();
    opt.zero_grad()

Both run in one process on a 1-rank gloo group with synthetic token batches of the config's shape
(no dataset or tokenizer). After a lock-step warm-up (which also checks that both compute the same
first-step loss from identical weights), the timed steps interleave the two loops step by step (both
on the same batch), split into `--rounds` rounds with the order (ours first / bare first) flipping
between rounds, so machine noise hits both. Batches are prebuilt tensors for both loops: data
loading is part of neither time. stdout carries only the JSON; DeepSpeed's chatter goes to stderr.

`ratio` is ours/bare of the median step times (the target applies to it). `ratio_of_min` (best step
of each) and `ratio_paired_median` (median over steps of ours/bare, each pair run back to back) are
noise-robust cross-checks. On a 2-core machine that is also running other work, 2 OpenMP threads
per step degrade badly and erratically (steps 10-30x slower); the JSON records the 1-minute load
average at start and end so such a run can be recognised (re-run on a quiet machine, or --threads 1).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import sys
import time
from pathlib import Path

from bench.common import cores, emit, loadavg, machine

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "neox" / "demo_cpu.yml"
TARGET_RATIO = 1.3



def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.trainer_overhead",
        description="Median time per training step of our DeepSpeed trainer vs a bare PyTorch loop (JSON on stdout).",
    )
    p.add_argument("--config", action="append", default=None, metavar="FILE",
                   help=f"YAML config (repeatable, merged like train.py); default {DEFAULT_CONFIG.relative_to(ROOT)}")
    p.add_argument("--steps", type=int, default=20, help="timed steps per loop (default 20)")
    p.add_argument("--rounds", type=int, default=4, help="rounds the timed steps are split into (default 4)")
    p.add_argument("--warmup", type=int, default=3, help="untimed lock-step warm-up steps per loop (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary of the synthetic batches (default 4096)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic batches (default 0)")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the JSON here")
    p.add_argument("--verbose", action="store_true", help="keep DeepSpeed's INFO logging (on stderr)")
    ns = p.parse_args(argv)
    if ns.steps < 1 or ns.rounds < 1 or ns.warmup < 1:
        p.error("--steps, --rounds and --warmup must be >= 1")
    if ns.rounds > ns.steps:
        p.error("--rounds must not exceed --steps")
    if ns.threads is not None and ns.threads < 1:
        p.error("--threads must be >= 1")
    return ns


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




@contextlib.contextmanager
def stdout_to_stderr():
    """Route fd 1 (Python prints and C-level writes alike) to stderr while the benchmark runs."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def synthetic_batches(n: int, micro_batch: int, seq_length: int, vocab: int, seed: int, device):
    """`n` micro-batches `(tokens, (labels, loss_mask))` shaped like BatchIterator's."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, vocab, (micro_batch, seq_length + 1), generator=g, dtype=torch.long)
        tokens, labels = x[:, :-1].contiguous(), x[:, 1:].contiguous()
        mask = torch.ones(micro_batch, seq_length, dtype=torch.float32)
        out.append((tokens.to(device), (labels.to(device), mask.to(device))))
    return out


def bare_step(model, opt, sched, micro_batches, clip: float) -> float:
    """One optimizer step of the plain PyTorch loop (gradient accumulation over `micro_batches`)."""
    import torch

    from neox_zoology.model.gpt import lm_loss

    total = 0.0
    ga = len(micro_batches)
    for tokens, labels in micro_batches:
        loss = lm_loss(model(tokens), labels)
        (loss / ga if ga > 1 else loss).backward()
        total += float(loss.detach())
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    sched.step()
    opt.zero_grad()
    return total / ga


def run_benchmark(ns: argparse.Namespace) -> dict:
    import logging
    import warnings

    import torch

    t_start = time.perf_counter()
    load_start = loadavg()
    threads = ns.threads or cores()
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated")
    if not ns.verbose:
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

    # One process, one rank, a port nobody else uses.
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))

    from neox_zoology.config import load
    from neox_zoology.parallel import setup as psetup
    from neox_zoology.parallel.cpu_compat import model_parallel_seed
    from neox_zoology.training.engine import build_engine, make_optimizer, model_config
    from neox_zoology.tokenizer import resolve_vocab
    from neox_zoology.training.loop import train_step
    from neox_zoology.model.gpt import SequentialGPT

    configs = ns.config or [str(DEFAULT_CONFIG)]
    args = load(configs, world_size=1)
    if args.pipe_parallel_size != 0 or args.tp != 1:
        raise SystemExit("trainer_overhead: the bare-loop reference needs pipe_parallel_size 0 and model_parallel_size 1")
    if args.dtype_name != "fp32":
        print(f"trainer_overhead: config dtype is {args.dtype_name}; the bare loop runs fp32", file=sys.stderr)
    args.vocab_size = ns.vocab
    resolve_vocab(args)  # no tokenizer: padded_vocab_size from vocab_size

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ga = args.gradient_accumulation_steps
    n_batches = ns.warmup + ns.steps
    pool = synthetic_batches(n_batches * ga, args.train_micro_batch_size_per_gpu, args.seq_length,
                             ns.vocab, ns.seed, device)

    def micro(i):  # the micro-batches of optimizer step i (same for both loops)
        return pool[i * ga:(i + 1) * ga]

    psetup.init_distributed("gloo")
    try:
        psetup.init_model_parallel(args.tp, args.pp)
        model_parallel_seed(args.seed)
        topo = None  # plain engine: the MPU adapter carries the groups
        engine = build_engine(args, topo)

        model = SequentialGPT(args, model_config(args)).to(device)
        model.load_state_dict(engine.module.state_dict())
        model.train()
        opt, sched = make_optimizer(args, model)
        clip = float(args.gradient_clipping or 0.0)

        def ours(i) -> float:
            return float(train_step(engine, iter(micro(i)), device))

        def bare(i) -> float:
            return bare_step(model, opt, sched, micro(i), clip)

        # Lock-step warm-up: same batch, same weights before step 0 -> same loss.
        ours_w, bare_w = [], []
        for i in range(ns.warmup):
            ours_w.append(ours(i))
            bare_w.append(bare(i))
        diffs = [abs(a - b) for a, b in zip(ours_w, bare_w)]

        # Timed: step by step, the two loops interleaved (same batch index), who goes first flipping
        # every round, so a burst of machine noise lands on both.
        sizes = [ns.steps // ns.rounds + (r < ns.steps % ns.rounds) for r in range(ns.rounds)]
        times = {"ours": [], "bare": []}
        fns = {"ours": ours, "bare": bare}
        step = ns.warmup
        for r, k in enumerate(sizes):
            order = ("ours", "bare") if r % 2 == 0 else ("bare", "ours")
            for j in range(k):
                for name in order:
                    sync()
                    t0 = time.perf_counter()
                    fns[name](step + j)
                    sync()
                    times[name].append(time.perf_counter() - t0)
            step += k
        zero_stage = int(engine.zero_optimization_stage())
        engine_type = type(engine).__name__
    finally:
        psetup.destroy()

    ours_med = statistics.median(times["ours"])
    bare_med = statistics.median(times["bare"])
    ratio = ours_med / bare_med
    return {
        "benchmark": "trainer_overhead",
        "config": [os.path.relpath(c, ROOT) if Path(c).is_absolute() else c for c in configs],
        "model": {
            "num_layers": args.num_layers,
            "hidden_size": args.hidden_size,
            "seq_length": args.seq_length,
            "micro_batch": args.train_micro_batch_size_per_gpu,
            "gradient_accumulation_steps": ga,
            "padded_vocab_size": args.padded_vocab_size,
            "layer_types": list(args.layer_types),
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": args.dtype_name,
        },
        "ours": {"engine": engine_type, "zero_stage": zero_stage, "step_s_median": ours_med,
                 "step_s_min": min(times["ours"]), "step_s": times["ours"]},
        "bare": {"optimizer": type(opt).__name__, "step_s_median": bare_med,
                 "step_s_min": min(times["bare"]), "step_s": times["bare"]},
        "ours_step_s": ours_med,
        "bare_step_s": bare_med,
        "ratio": ratio,
        "ratio_of_min": min(times["ours"]) / min(times["bare"]),
        "ratio_paired_median": statistics.median(a / b for a, b in zip(times["ours"], times["bare"])),
        "target_ratio": TARGET_RATIO,
        "target_met": ratio <= TARGET_RATIO,
        "steps": ns.steps,
        "rounds": ns.rounds,
        "warmup": ns.warmup,
        "threads": threads,
        "loss_first_step_abs_diff": diffs[0],
        "loss_warmup_max_abs_diff": max(diffs),
        "warmup_losses": {"ours": ours_w, "bare": bare_w},
        "machine": {**machine(threads), "loadavg_1min_at_start": load_start},
        "wall_s": time.perf_counter() - t_start,
    }


def main(argv=None) -> dict:
    """Run the benchmark, print its JSON (only that) on stdout, write it to --out; return the dict."""
    ns = parse(argv)
    with stdout_to_stderr():
        result = run_benchmark(ns)
    emit(result, ns.out)
    return result


if __name__ == "__main__":
    main()

"""Training throughput of whole models through our trainer: tokens/s, model TFLOP/s and peak memory.

    python -m bench.train_throughput [--config configs/neox/attention_160m.yml --config ...]
                                     [--seq-len 2048 8192] [--steps 3] [--warmup 1] [--micro-batch 1]
                                     [--checkpoint-activations auto|on|off] [--num-layers N]
                                     [--only-at L=NAME,...] [--tokens zipf|uniform] [--threads N]
                                     [--bf16] [--set KEY=VALUE ...] [--out FILE.json] [--md FILE.md]

Each `--config` is one model (default: the nine 160M configs of the Zoology comparison). Every
(config, sequence length) runs in a fresh subprocess (a clean memory peak; a crash or a timeout of one
is reported in its row and the others go on). Inside it, exactly what the training loop does: one
rank (gloo on CPU, NCCL on a GPU), megatron-core model parallel state, `build_engine` (the DeepSpeed engine with the config's
ZeRO stage and the torch AdamW of `make_optimizer`), and `train_step` per optimizer step, on
synthetic token batches (no dataset, no tokenizer).

CPU override (as `configs/neox/neox_cpu_override.yml` and the paper-config tests do): fp32
(`bf16`/`fp16` off), `pipe_parallel_size: 0` (plain engine), `seq_length` and
`max_position_embeddings` = the measured length, micro-batch `--micro-batch` (default 1), no gradient
accumulation, no tokenizer files (`vocab_size` from the config, else `--vocab`). Everything else
(shape, mixers, ZeRO stage, optimizer, clipping) is the config's.

On a GPU the same command runs on `cuda:0` (CUDA synchronised around every timed region and every
breakdown hook); `--bf16` trains in DeepSpeed bf16 as the configs do for GPUs. Each row then also has
`mfu` (TFLOP/s over the device's dense bf16 peak from `training.metrics.PEAK_BF16_FLOPS`; None for an
unknown device) and `gpu_peak_mem_bytes` (`torch.cuda.max_memory_allocated` since before the engine
was built), and the Markdown table shows those.

Measured per row:
- `tokens_per_s` = micro_batch x L / the median wall time of the `--steps` timed steps, after `--warmup`
  untimed ones (the first builds the optimizer states);
- `tflops` = tokens_per_s x 3 x `flops.model_forward_per_token(args)` at this L (fwd + bwd = 3 x fwd;
  flops.py's conventions: attention counts the full L x L square, programmatic selection counts every
  position; activation-recompute FLOPs are not counted: model FLOPs, as in MFU);
- `peak_mem_bytes` = peak RSS of the child minus its RSS before the engine was built (weights,
  gradients, optimizer states, activations and temporaries; Linux `clear_refs` resets the peak);
- `cpu_s`: the median process CPU time of the timed steps, and `tokens_per_cpu_s`; on a machine shared
  with other work the wall time stretches with the load while the CPU time (at `--threads 1`) hardly
  does, so the `*_cpu` ratios are the cross-check there (with 2 OpenMP threads on a busy 2-core machine
  spinning threads inflate both);
- `saved_for_backward_bytes`: the tensors autograd keeps from the forward for the backward (parameters
  excluded), counted with `saved_tensors_hooks` on the last warm-up step;
- `breakdown`: a time split of the last warm-up step (hooks on every block's mixer, MLP and norms,
  forward and backward; `other` = embedding, LM head, loss, residual adds; `optimizer` = engine.step(),
  i.e. clipping, ZeRO bookkeeping and AdamW). With one warm-up step it includes first-step costs.
- `selected_fraction` (sparse hybrids): the mean fraction of positions the sparse layers attended from.

Ratios against peers measured in the same run at the same L: `x_attention` = tokens/s / tokens/s of
the pure-attention config, `x_baseconv` = tokens/s / tokens/s of the pure-BaseConv config.

Activation checkpointing (`--checkpoint-activations`): `on`/`off` for every row; `auto` decides per
length, once for all configs at that length (so that ratios compare like with like): on when the
estimated peak of the largest config without it (model states at STATE_BYTES_PER_PARAM bytes per
parameter + ACT_FLOATS_PER_CHANNEL fp32 values per layer, token and channel + LOGIT_COPIES copies of the
fp32 logits) exceeds MEMORY_FRACTION of physical memory. For the 24-layer 160M models at micro-batch 1
that is off at L=2048 (~11 GB estimated) and on at L=8192 (~33 GB). The JSON records the decision and estimate.

Synthetic tokens (`--tokens`): `zipf` (default) draws ids with P(rank r) ~ r^-1.1, so that, as in
natural text, most positions repeat an earlier token (~60% at L=2048, ~70% at L=8192): the amount of
work of programmatic selection (`match: token`) depends on it. `uniform` ids repeat ~2-3% at L=2048.

`--num-layers N` gives every config N layers (layer types resampled in proportion, each type kept at
least once, the minority types spread evenly). It breaks the parameter-matched comparison of the paper
shapes (attention_160m has 12 layers, the BaseConv models 24), and at small N the LM head (~0.23 GFLOP
per token for training, the same for all configs) dominates: use it for quick runs only.

`--only-at 8192=attention_160m,baseconv_160m` measures only those configs (file stems) at that length (the
long lengths are the expensive ones); the checkpointing decision there considers only them.

Targets (`targets` in the JSON, each with `meets`): BaseConv >= 1.3x attention's tokens/s at every L,
and a larger ratio at each longer L; every sparse hybrid (a config with `sparse_*` layers) within 15% of
pure BaseConv (x_baseconv >= 0.85). `meets` is null when a peer is missing or failed.

stdout carries only the JSON; progress and DeepSpeed's logging go to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import cores, emit, loadavg, machine, maxrss_bytes, mem_total_bytes, reset_peak, rss_bytes

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs" / "neox").glob("*_160m.yml"))
"""Every paper config at 160M: a new layer type with its configs is measured without editing this file."""

TARGET_BASECONV_X_ATTENTION = 1.3  # CPU
TARGET_SPARSE_X_BASECONV = 0.85
TARGET_BASECONV_X_ATTENTION_GPU = 1.15  # rows measured on a GPU (bf16, 360M configs in the README)
TARGET_ATTENTION_MFU_GPU = 0.40

# Auto activation checkpointing: an estimate of the peak without it, from the shape alone.
ACT_FLOATS_PER_CHANNEL = 40
"""fp32 values kept per layer, token and hidden channel for the backward: an upper bound over the 160M
configs (saved_tensors_hooks at L=1024 count per layer: BaseConv 21, attention 24, long conv 27, RWKV 29,
Hyena 31, H3 38), a little room left for backward temporaries."""
LOGIT_COPIES = 3
"""[tokens, vocab] fp32 buffers alive at once around the LM head and loss (logits, their transposed copy,
log-softmax output / the gradient)."""
STATE_BYTES_PER_PARAM = 24
"""fp32 weights, gradients, Adam m and v (16) + ZeRO-1's flat fp32 partition and gradient buffer (8)."""
MEMORY_FRACTION = 0.7
ZIPF_EXPONENT = 1.1


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.train_throughput",
        description="Training tokens/s, TFLOP/s and peak memory per config and length, with ratios to attention "
                    "and BaseConv (JSON on stdout).")
    p.add_argument("--config", action="append", default=None, metavar="FILE",
                   help="a model config (repeatable: one row per config and length); default: the nine *_160m "
                        "configs of the comparison")
    p.add_argument("--seq-len", type=int, nargs="+", action="extend", default=None, dest="seq_len",
                   help="sequence lengths (default 2048)")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per row (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them (default 1)")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per step (default 1)")
    p.add_argument("--checkpoint-activations", choices=("auto", "on", "off"), default="auto",
                   help="activation checkpointing per block; auto: on at a length where the largest config "
                        "would not fit otherwise (default auto)")
    p.add_argument("--num-layers", type=int, default=None, metavar="N",
                   help="give every config N layers (quick runs; changes the comparison, see the module docstring)")
    p.add_argument("--tokens", choices=("zipf", "uniform"), default="zipf",
                   help="distribution of the synthetic token ids (default zipf: text-like repeats)")
    p.add_argument("--vocab", type=int, default=50257, help="vocab_size for configs without one (default 50257)")
    p.add_argument("--only-at", action="append", default=[], metavar="L=NAME[,NAME...]",
                   help="at length L run only these configs (file stems, e.g. 8192=attention_160m,baseconv_160m); "
                        "repeatable")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 as configured for GPUs (DeepSpeed bf16) instead of the CPU default fp32")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="extra config override applied to every config (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic batches (default 0)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per (config, length) run (default 1800)")
    p.add_argument("--profile", default=None, metavar="FILE",
                   help="after the timed steps, profile 2 more steps per row with torch.profiler and append the "
                        "table of the most expensive kernels to FILE")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the JSON here")
    p.add_argument("--md", default=None, metavar="FILE", help="also write a Markdown table here")
    p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    ns.seq_len = ns.seq_len or [2048]
    if ns.steps < 1 or ns.warmup < 1:
        p.error("--steps and --warmup must be >= 1 (the last warm-up step carries the breakdown)")
    if ns.micro_batch < 1 or min(ns.seq_len) < 2:
        p.error("--micro-batch must be >= 1 and every --seq-len >= 2")
    if ns.num_layers is not None and ns.num_layers < 1:
        p.error("--num-layers must be >= 1")
    if ns.threads is not None and ns.threads < 1:
        p.error("--threads must be >= 1")
    only: dict[int, list[str]] = {}
    for item in ns.only_at:
        length, sep, names = item.partition("=")
        if not sep or not length.strip().isdigit() or not names.strip():
            p.error(f"--only-at {item!r}: use L=NAME[,NAME...], e.g. 8192=attention_160m,baseconv_160m")
        only.setdefault(int(length), []).extend(n.strip() for n in names.split(",") if n.strip())
    ns.only_at = only
    return ns


# ------------------------------------------------------------------------------------------- configs

def resample_layer_types(types: list[str], n: int) -> list[str]:
    """`n` layer types in the proportions of `types`: every type at least once, the most common type
    filling the rest, the others spread evenly (as the hybrids intersperse their sparse layers)."""
    counts: dict[str, int] = {}
    for t in types:
        counts[t] = counts.get(t, 0) + 1
    if len(counts) > n:
        raise ValueError(f"{n} layers cannot hold the {len(counts)} layer types {sorted(counts)}")
    major = max(counts, key=lambda t: counts[t])  # first of the most common
    out: list[str | None] = [None] * n
    for t, c in counts.items():
        if t == major:
            continue
        want = max(1, round(c * n / len(types)))
        free = [i for i in range(n) if out[i] is None]
        want = min(want, len(free) - 1)  # leave the most common type a layer
        for j in range(want):
            target = (j + 0.5) * n / want
            i = min(free, key=lambda k: (abs(k + 0.5 - target), -k))  # ties: the later layer
            out[i] = t
            free.remove(i)
    return [major if t is None else t for t in out]


def _compress(types: list[str]) -> list:
    """attention_config of an explicit layer list: [[[type], run length], ...]."""
    runs: list = []
    for t in types:
        if runs and runs[-1][0] == [t]:
            runs[-1][1] += 1
        else:
            runs.append([[t], 1])
    return runs


def override_sets(config: str, seq_len: int, ns, checkpoint: bool) -> list[str]:
    """The `--set` overrides that make `config` one CPU measurement at `seq_len`."""
    from neox_zoology.config import load

    base = [f"bf16={{enabled: {'true' if ns.bf16 else 'false'}}}", "fp16={enabled: false}", "precision=null",
            "pipe_parallel_size=0",
            f"seq_length={seq_len}", f"max_position_embeddings={seq_len}",
            f"train_micro_batch_size_per_gpu={ns.micro_batch}", "gradient_accumulation_steps=1",
            f"train_batch_size={ns.micro_batch}", "vocab_file=null", "merge_file=null",
            f"checkpoint_activations={'true' if checkpoint else 'false'}", *ns.sets]
    raw = load([str(_path(config))], sets=base, world_size=1)
    if raw.vocab_size is None:
        base.append(f"vocab_size={ns.vocab}")
    if ns.num_layers is not None:
        from neox_zoology import registry

        types = [registry.config_name(t) for t in resample_layer_types(list(raw.layer_types), ns.num_layers)]
        base += [f"num_layers={ns.num_layers}", f"attention_config={json.dumps(_compress(types))}"]
    return base


def _path(config: str) -> Path:
    p = Path(config)
    return p if p.is_absolute() else ROOT / p


def load_args(config: str, sets: list[str]):
    from neox_zoology.config import load
    from neox_zoology.tokenizer import resolve_vocab

    args = load([str(_path(config))], sets=sets, world_size=1)
    resolve_vocab(args)
    return args


def parameter_count(args) -> int:
    """Parameters of the model as `build_engine` builds it (meta device: no memory, no init)."""
    import torch

    from neox_zoology.model.gpt import SequentialGPT
    from neox_zoology.training.engine import model_config

    with torch.device("meta"):
        model = SequentialGPT(args, model_config(args, perform_initialization=False))
    return sum(p.numel() for p in model.parameters())


def estimated_peak_bytes(args, params: int, micro_batch: int, checkpoint: bool) -> int:
    tokens = micro_batch * args.seq_length
    kept_layers = 1 if checkpoint else args.num_layers  # checkpointed: one block's recompute at a time
    act = 4 * tokens * args.hidden_size * ACT_FLOATS_PER_CHANNEL * kept_layers
    if checkpoint:
        act += 4 * tokens * args.hidden_size * args.num_layers  # each block's input
    logits = 4 * tokens * args.padded_vocab_size * LOGIT_COPIES
    return int(STATE_BYTES_PER_PARAM * params + act + logits)


# ------------------------------------------------------------------------------------ one measurement

def synthetic_batches(n: int, micro_batch: int, seq_length: int, vocab: int, kind: str, seed: int):
    """`n` micro-batches `(tokens, (labels, loss_mask))` shaped like BatchIterator's."""
    import torch

    g = torch.Generator().manual_seed(seed)
    if kind == "zipf":
        weights = torch.arange(1, vocab + 1, dtype=torch.float64).pow(-ZIPF_EXPONENT)
        ranks = torch.randperm(vocab, generator=g)  # which id gets which frequency rank
    out = []
    for _ in range(n):
        if kind == "zipf":
            x = ranks[torch.multinomial(weights, micro_batch * (seq_length + 1), replacement=True, generator=g)]
            x = x.view(micro_batch, seq_length + 1)
        else:
            x = torch.randint(0, vocab, (micro_batch, seq_length + 1), generator=g, dtype=torch.long)
        out.append((x[:, :-1].contiguous(), (x[:, 1:].contiguous(), torch.ones(micro_batch, seq_length))))
    return out


class StepBreakdown:
    """Wall time per component of one plain-engine step, from module hooks (CPU work is synchronous).

    Forward hooks time each block's mixer, MLP and norms; full backward hooks their backward. A forward
    recomputed during the backward (activation checkpointing) counts in the backward phase.
    """

    def __init__(self, model, sync=lambda: None):
        from neox_zoology.model.block import ZooBlock

        self.sync = sync  # CUDA: synchronise at every hook, so that each time belongs to its module
        self.phase = "forward"
        self.totals: dict[tuple[str, str], float] = {}
        self.layers: dict[str, int] = {}
        self._start: dict[tuple[int, str], float] = {}
        self._handles = []
        for block in model.modules():
            if not isinstance(block, ZooBlock):
                continue
            parts = {f"mixer:{block.layer_type}": (block.mixer,), "mlp": (block.mlp,),
                     "norm": (block.input_norm, block.post_norm)}
            for cat, mods in parts.items():
                mods = [m for m in mods if m is not None]  # blocks without an MLP (mamba's default)
                self.layers[cat] = self.layers.get(cat, 0) + len(mods)
                for mod in mods:
                    self._hook(mod, cat)

    def _hook(self, mod, cat):
        def start(kind):
            def f(*_):
                self.sync()
                self._start[(id(mod), kind)] = time.perf_counter()
            return f

        def stop(kind):
            def f(*_):
                self.sync()
                t0 = self._start.pop((id(mod), kind), None)
                if t0 is not None:
                    key = (self.phase, cat)
                    self.totals[key] = self.totals.get(key, 0.0) + time.perf_counter() - t0
            return f

        self._handles += [mod.register_forward_pre_hook(start("f")), mod.register_forward_hook(stop("f")),
                          mod.register_full_backward_pre_hook(start("b")), mod.register_full_backward_hook(stop("b"))]

    def remove(self):
        for h in self._handles:
            h.remove()

    def report(self, wall: dict[str, float]) -> dict:
        out = {"wall_s": wall, "components": {}}
        cats = sorted({c for _, c in self.totals})
        for cat in cats:
            fwd, bwd = self.totals.get(("forward", cat), 0.0), self.totals.get(("backward", cat), 0.0)
            n = self.layers.get(cat, 1)
            out["components"][cat] = {"layers": n, "forward_s": fwd, "backward_s": bwd, "total_s": fwd + bwd,
                                      "per_layer_s": (fwd + bwd) / n}
        fwd_other = wall["forward_s"] + wall["loss_s"] - sum(self.totals.get(("forward", c), 0.0) for c in cats)
        bwd_other = wall["backward_s"] - sum(self.totals.get(("backward", c), 0.0) for c in cats)
        out["components"]["other"] = {"forward_s": fwd_other, "backward_s": bwd_other,
                                      "total_s": fwd_other + bwd_other,
                                      "what": "embedding, final norm, LM head, loss, residual adds, gradient hooks"}
        out["components"]["optimizer"] = {"total_s": wall["optimizer_s"],
                                          "what": "engine.step(): clipping, ZeRO bookkeeping, AdamW"}
        return out


def instrumented_step(engine, batch, device, sync=lambda: None) -> tuple[float, dict, int]:
    """What `train_step` does for the plain engine (one micro-batch), timed per phase, with the bytes
    autograd saved for the backward counted. Returns (loss, breakdown, saved bytes)."""
    import torch

    from neox_zoology.data import to_device
    from neox_zoology.model.gpt import lm_loss

    params = {p.untyped_storage().data_ptr() for p in engine.module.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params and s.device.type != "meta":
            saved[s.data_ptr()] = s.nbytes()
        return t

    bd = StepBreakdown(engine.module, sync)
    tokens, labels = to_device(batch, device)
    try:
        sync()
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = engine(tokens)
            sync()
            t1 = time.perf_counter()
            loss = lm_loss(logits, labels)
        sync()
        t2 = time.perf_counter()
        saved_bytes = sum(saved.values())
        bd.phase = "backward"
        engine.backward(loss)
        sync()
        t3 = time.perf_counter()
        engine.step()
        sync()
        t4 = time.perf_counter()
    finally:
        bd.remove()
    wall = {"forward_s": t1 - t0, "loss_s": t2 - t1, "backward_s": t3 - t2, "optimizer_s": t4 - t3,
            "step_s": t4 - t0}
    return float(loss.detach()), bd.report(wall), saved_bytes


def profile_steps(step, n: int, device, path: str, label: str, rows: int = 30) -> None:
    """Run `step(i)` for i < n under torch.profiler and append the table of the operators with the most
    device time (CPU time on a CPU) to `path`, headed by `label`."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for i in range(n):
            step(i)
        if cuda:
            torch.cuda.synchronize()
    key = "device_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70)
    with open(path, "a") as f:
        f.write(f"## {label}: {n} training steps, sorted by {key}\n\n{table}\n\n")


def one(spec: dict) -> dict:
    """One (config, length) measurement in this (fresh) process."""
    import gc
    import logging
    import warnings

    import torch

    from bench.trainer_overhead import free_port, stdout_to_stderr

    threads = spec["threads"] or cores()
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    with stdout_to_stderr():
        from neox_zoology import flops
        from neox_zoology.parallel import setup as psetup
        from neox_zoology.parallel.cpu_compat import model_parallel_seed
        from neox_zoology.training.engine import build_engine
        from neox_zoology.training.loop import before_step, layer_stats, train_step

        args = load_args(spec["config"], spec["sets"])
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        batches = synthetic_batches(spec["warmup"] + spec["steps"], args.train_micro_batch_size_per_gpu,
                                    args.seq_length, args.vocab_size, spec["tokens"], spec["seed"])
        psetup.init_distributed("nccl" if device.type == "cuda" else "gloo")
        try:
            psetup.init_model_parallel(args.tp, args.pp)
            model_parallel_seed(args.seed)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            peak_reset = reset_peak()
            rss_before = rss_bytes()
            t_build = time.perf_counter()
            engine = build_engine(args, None)
            build_s = time.perf_counter() - t_build
            params = sum(p.numel() for p in engine.module.parameters())

            def step(i) -> float:
                before_step(engine, args)  # as the loop does, every step
                return float(train_step(engine, iter(batches[i:i + 1]), device))

            warm_losses = [step(i) for i in range(spec["warmup"] - 1)]
            before_step(engine, args)
            loss, breakdown, saved_bytes = instrumented_step(engine, batches[spec["warmup"] - 1], device, sync)
            warm_losses.append(loss)
            times, cpu_times, losses = [], [], []
            for i in range(spec["warmup"], spec["warmup"] + spec["steps"]):
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                losses.append(step(i))
                sync()
                times.append(time.perf_counter() - t0)
                cpu_times.append(time.process_time() - c0)
            stats = layer_stats(engine, args)
            peak = maxrss_bytes()
            gpu_peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
            gpu_reserved = torch.cuda.max_memory_reserved() if device.type == "cuda" else None
            gpu_used = (lambda free, total: total - free)(*torch.cuda.mem_get_info()) if device.type == "cuda" else None
            if spec.get("profile"):
                base = len(batches)
                batches += synthetic_batches(2, args.train_micro_batch_size_per_gpu, args.seq_length, args.vocab_size,
                                             spec["tokens"], spec["seed"] + 1)
                profile_steps(lambda i: step(base + i), 2, device, spec["profile"], spec.get("label", spec["config"]))
            device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
            zero_stage = int(engine.zero_optimization_stage())
            engine_type = type(engine).__name__
        finally:
            psetup.destroy()

    from neox_zoology.training.metrics import device_peak_flops

    peak_flops = device_peak_flops()
    fractions = [v for k, v in stats.items() if k.endswith("/selected_fraction")]
    step_s = statistics.median(times)
    tokens_per_step = args.train_micro_batch_size_per_gpu * args.seq_length * args.gradient_accumulation_steps
    flops_per_token = 3 * flops.model_forward_per_token(args)
    tokens_per_s = tokens_per_step / step_s
    return {
        "num_layers": args.num_layers,
        "hidden_size": args.hidden_size,
        "layer_types": dict(sorted({t: args.layer_types.count(t) for t in args.layer_types}.items())),
        "parameters": params,
        "flops_per_token": flops_per_token,
        "engine": engine_type,
        "zero_stage": zero_stage,
        "dtype": args.dtype_name,
        "tokens_per_step": tokens_per_step,
        "step_s": step_s,
        "step_s_all": times,
        "tokens_per_s": tokens_per_s,
        "tflops": tokens_per_s * flops_per_token / 1e12,
        "device": device_name,
        "mfu": tokens_per_s * flops_per_token / peak_flops if peak_flops else None,
        "gpu_peak_mem_bytes": gpu_peak,
        "gpu_peak_reserved_bytes": gpu_reserved,
        "gpu_device_used_bytes": gpu_used,
        "cpu_s": statistics.median(cpu_times),
        "cpu_s_all": cpu_times,
        "tokens_per_cpu_s": tokens_per_step / statistics.median(cpu_times),
        "build_s": build_s,
        "peak_mem_bytes": peak - rss_before if peak_reset else None,
        "peak_rss_bytes": peak,
        "rss_before_bytes": rss_before,
        "saved_for_backward_bytes": saved_bytes,
        "breakdown": breakdown,
        "selected_fraction": statistics.mean(fractions) if fractions else None,
        "layer_stats": stats,
        "losses": {"warmup": warm_losses, "timed": losses},
        "threads": threads,
    }


# --------------------------------------------------------------------------------------------- driver

def _name(config: str) -> str:
    return Path(config).stem


def _kind(layer_types) -> str:
    types = set(layer_types)
    if types == {"attention"}:
        return "attention"
    if types == {"baseconv"}:
        return "baseconv"
    if any(t.startswith("sparse_") for t in types):
        return "sparse"
    return "other"


def plan(ns) -> tuple[list[dict], dict]:
    """The rows to run (config x length, their overrides) and the checkpointing decision per length."""
    all_configs = ns.config or DEFAULT_CONFIGS
    names = {_name(c) for c in all_configs}
    for L, wanted in ns.only_at.items():
        unknown = sorted(set(wanted) - names)
        if L not in ns.seq_len or unknown:
            raise SystemExit(f"bench.train_throughput: --only-at {L}: " + (
                f"{', '.join(unknown)} is not among the configs ({', '.join(sorted(names))})" if unknown
                else f"{L} is not a --seq-len"))
    rows, decisions = [], {}
    for L in ns.seq_len:
        configs = [c for c in all_configs if L not in ns.only_at or _name(c) in ns.only_at[L]]
        estimates, infos = {}, {}
        for config in configs:
            info = {"config": config, "name": _name(config), "seq_len": L}
            try:
                sets = override_sets(config, L, ns, checkpoint=False)
                args = load_args(config, sets)
                params = parameter_count(args)
                info.update(kind=_kind(args.layer_types), num_layers=args.num_layers, parameters=params,
                            flops_per_token=3 * _forward_flops(args))
                estimates[config] = (estimated_peak_bytes(args, params, ns.micro_batch, False),
                                     estimated_peak_bytes(args, params, ns.micro_batch, True))
            except Exception as exc:  # noqa: BLE001 - a bad config is a failed row, not a failed run
                info.update(kind="other", error=f"{type(exc).__name__}: {exc}")
            infos[config] = info
        total = mem_total_bytes()
        worst = max((e[0] for e in estimates.values()), default=0)
        if ns.checkpoint_activations == "auto":
            ckpt = bool(total) and worst > MEMORY_FRACTION * total
        else:
            ckpt = ns.checkpoint_activations == "on"
        decisions[str(L)] = {
            "checkpoint_activations": ckpt, "mode": ns.checkpoint_activations,
            "estimated_peak_without_bytes": worst,
            "estimated_peak_with_bytes": max((e[1] for e in estimates.values()), default=0),
            "memory_budget_bytes": int(MEMORY_FRACTION * total) if total else None,
        }
        for config in configs:
            info = infos[config]
            info["checkpoint_activations"] = ckpt
            if "error" not in info:
                info["estimated_peak_bytes"] = estimates[config][1 if ckpt else 0]
                info["sets"] = override_sets(config, L, ns, checkpoint=ckpt)
            rows.append(info)
    return rows, decisions


def _forward_flops(args) -> float:
    from neox_zoology import flops

    return flops.model_forward_per_token(args)


def run_row(info: dict, ns) -> dict:
    spec = {"config": info["config"], "sets": info["sets"], "steps": ns.steps, "warmup": ns.warmup,
            "tokens": ns.tokens, "seed": ns.seed, "threads": ns.threads,
            "profile": str(Path(ns.profile).resolve()) if ns.profile else None,
            "label": f"{info['name']} L={info['seq_len']}"}
    cmd = [sys.executable, "-m", "bench.train_throughput", "--_one", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=ns.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {ns.timeout:g} s", "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        return {"error": f"exit status {proc.returncode}: {tail}", "wall_s": wall}
    return {**json.loads(lines[-1]), "wall_s": wall}


def add_ratios(rows: list[dict]) -> None:
    for L in sorted({r["seq_len"] for r in rows}):
        at = [r for r in rows if r["seq_len"] == L]
        peers = {}
        for kind in ("attention", "baseconv"):
            peer = next((r for r in at if r.get("kind") == kind), None)
            peers[kind] = peer.get("tokens_per_s") if peer else None
            peers[kind + "_cpu"] = peer.get("tokens_per_cpu_s") if peer else None
        for r in at:
            for kind in ("attention", "baseconv"):
                tps, ref = r.get("tokens_per_s"), peers[kind]
                r[f"x_{kind}"] = tps / ref if tps is not None and ref else None
                tpc, ref = r.get("tokens_per_cpu_s"), peers[kind + "_cpu"]
                r[f"x_{kind}_cpu"] = tpc / ref if tpc is not None and ref else None


def targets(rows: list[dict]) -> list[dict]:
    """Each target with its wall-time ratio (`value`, what `meets` judges) and the same ratio of CPU time
    (`value_cpu`, `meets_cpu`: less sensitive to other work on a shared machine)."""

    def entry(text, row, key, threshold, threshold_cpu=None, strict=False):
        def judge(v, t):
            if v is None or t is None:
                return None
            return v > t if strict else v >= t

        v, vc = row.get(key), row.get(key + "_cpu")
        tc = threshold if threshold_cpu is None else threshold_cpu
        return {"target": text, "config": row["name"], "seq_len": row["seq_len"], "value": v, "threshold": threshold,
                "meets": judge(v, threshold), "value_cpu": vc, "threshold_cpu": tc, "meets_cpu": judge(vc, tc)}

    out = []
    gpu = any(r.get("device", "cpu") != "cpu" for r in rows if "error" not in r)
    x_attention = TARGET_BASECONV_X_ATTENTION_GPU if gpu else TARGET_BASECONV_X_ATTENTION
    lengths = sorted({r["seq_len"] for r in rows})
    if gpu:
        for r in rows:
            if r.get("kind") == "attention" and r.get("mfu") is not None:
                out.append(entry(f"{r['name']} MFU >= {TARGET_ATTENTION_MFU_GPU:.0%} at L={r['seq_len']}", r, "mfu",
                                 TARGET_ATTENTION_MFU_GPU))
    base = {r["seq_len"]: r for r in rows if r.get("kind") == "baseconv"}
    for i, L in enumerate(lengths):
        b = base.get(L)
        if b is None:
            continue
        out.append(entry(f"{b['name']} tokens/s >= {x_attention}x attention at L={L}", b, "x_attention", x_attention))
        prev = base.get(lengths[i - 1]) if i > 0 else None
        if prev is not None:
            out.append(entry(f"{b['name']} x_attention larger at L={L} than at L={lengths[i - 1]}", b, "x_attention",
                             prev.get("x_attention"), prev.get("x_attention_cpu"), strict=True))
    for r in rows:
        if r.get("kind") == "sparse":
            out.append(entry(f"{r['name']} tokens/s >= {TARGET_SPARSE_X_BASECONV}x baseconv at L={r['seq_len']}", r,
                             "x_baseconv", TARGET_SPARSE_X_BASECONV))
    return out


def run(ns) -> dict:
    t_start, load_start = time.perf_counter(), loadavg()
    rows, decisions = plan(ns)
    for info in rows:
        if "error" in info:
            print(f"bench.train_throughput: {info['name']} L={info['seq_len']}: {info['error']}", file=sys.stderr)
            continue
        print(f"bench.train_throughput: {info['name']} L={info['seq_len']} "
              f"(checkpoint_activations={info['checkpoint_activations']}) ...", file=sys.stderr, flush=True)
        load_before = loadavg()
        result = run_row(info, ns)
        info.update(result, loadavg_1min_before=load_before, loadavg_1min_after=loadavg())
        info.pop("sets")
        msg = info.get("error") or f"{info['tokens_per_s']:.1f} tokens/s, {info['step_s']:.2f} s/step"
        print(f"bench.train_throughput:   {msg} ({info['wall_s']:.0f} s)", file=sys.stderr, flush=True)
        if ns.out:  # what is measured so far, in case the whole run is stopped (replaced at the end)
            done = [r for r in rows if "wall_s" in r or "error" in r]
            from neox_zoology.io import atomic_write_json

            atomic_write_json(ns.out, {"benchmark": "train_throughput", "partial": True, "results": done,
                                       "targets": []})
    add_ratios(rows)
    tgts = targets(rows)
    decided = [t["meets"] for t in tgts if t["meets"] is not None]
    failed = [f"{r['name']} L={r['seq_len']}" for r in rows if "error" in r]
    if failed:
        print(f"bench.train_throughput: failed: {', '.join(failed)}", file=sys.stderr)
    return {
        "benchmark": "train_throughput",
        "configs": ns.config or DEFAULT_CONFIGS,
        "seq_lens": ns.seq_len,
        "micro_batch": ns.micro_batch,
        "steps": ns.steps,
        "warmup": ns.warmup,
        "num_layers_override": ns.num_layers,
        "only_at": {str(L): names for L, names in ns.only_at.items()},
        "tokens": ns.tokens,
        "dtype": "bf16" if ns.bf16 else "fp32",
        "overrides": f"bf16 {'on' if ns.bf16 else 'off'}, fp16 off, pipe_parallel_size 0 (plain DeepSpeed engine), seq_length = L, micro-batch "
                     "--micro-batch, no gradient accumulation, ZeRO stage and optimizer as configured",
        "checkpoint_activations": decisions,
        "results": rows,
        "targets": tgts,
        "meets": all(decided) if decided else None,
        "failed": failed,
        "machine": {**machine(ns.threads or cores()), "loadavg_1min_at_start": load_start},
        "wall_s": time.perf_counter() - t_start,
    }


# -------------------------------------------------------------------------------------------- output

def _fmt(v, spec: str, missing: str = "-") -> str:
    return missing if v is None else format(v, spec)


def _ratio(row: dict, key: str) -> str:
    if row.get(key) is None:
        return "-"
    return f"{row[key]:.2f} ({_fmt(row.get(key + '_cpu'), '.2f')})"


def _peak(r: dict, gpu: bool):
    return r.get("gpu_peak_mem_bytes") if gpu else r["peak_mem_bytes"]


def markdown(result: dict) -> str:
    m = result["machine"]
    ok = [r for r in result["results"] if "error" not in r]
    device = ok[0].get("device", "cpu") if ok else "cpu"
    gpu = device != "cpu"
    lines = [
        f"# Training throughput through the trainer ({result['dtype']}, {'CPU' if not gpu else device})",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, torch {m['torch']}"
        f"{', deepspeed ' + m['deepspeed'] if m.get('deepspeed') else ''}; load average (1 min) "
        f"{m.get('loadavg_1min_at_start')} at start, {m.get('loadavg_1min_at_end')} at end. "
        f"Micro-batch {result['micro_batch']}, {result['warmup']} warm-up + {result['steps']} timed steps "
        f"(median), synthetic {result['tokens']} tokens; `build_engine` + `train_step` on one rank. "
        f"Wall time {result['wall_s']:.0f} s.",
        "",
    ]
    if result["num_layers_override"]:
        lines += [f"**Every config cut to {result['num_layers_override']} layers (`--num-layers`): not the "
                  "parameter-matched paper shapes.**", ""]
    ck = ", ".join(f"L={L}: {'on' if d['checkpoint_activations'] else 'off'}"
                   for L, d in result["checkpoint_activations"].items())
    lines += [f"Activation checkpointing ({next(iter(result['checkpoint_activations'].values()))['mode']}): {ck} "
              "(the same for every config at a length).", ""]
    lines += ["Ratios: of tokens/s (wall time), in parentheses of tokens per CPU-second of the process (less "
              "sensitive to other work on the machine).", ""]
    mfu_col = any(r.get("mfu") is not None for r in ok)
    lines += ["| config | layers | params (M) | train GFLOP/token | L | ckpt | tokens/s | x attention | x baseconv "
              f"| TFLOP/s |{' MFU |' if mfu_col else ''} peak memory GB{' (GPU)' if gpu else ''} | load before/after |",
              f"|---|---:|---:|---:|---:|---|---:|---:|---:|---:|{'---:|' if mfu_col else ''}---:|---|"]
    for r in result["results"]:
        if "error" in r:
            err = r["error"].splitlines()[0][:120].replace("|", "/")
            lines.append(f"| {r['name']} | {r.get('num_layers', '-')} | - | - | {r['seq_len']} | - | "
                         f"failed: {err} | - | - | - |{' - |' if mfu_col else ''} - | - |")
            continue
        lines.append(
            f"| {r['name']} | {r['num_layers']} | {r['parameters'] / 1e6:.1f} | {r['flops_per_token'] / 1e9:.3f} | "
            f"{r['seq_len']} | {'on' if r['checkpoint_activations'] else 'off'} | {r['tokens_per_s']:.1f} | "
            f"{_ratio(r, 'x_attention')} | {_ratio(r, 'x_baseconv')} | {r['tflops']:.3f} | "
            + (f"{_fmt(r.get('mfu') and 100 * r['mfu'], '.1f')}% | " if mfu_col else "")
            + f"{_fmt(_peak(r, gpu) and _peak(r, gpu) / 1e9, '.2f')} | "
            f"{r.get('loadavg_1min_before')}/{r.get('loadavg_1min_after')} |")
    lines += ["", "Time per component of one step (last warm-up step, seconds; per layer in parentheses):", "",
              "| config | L | mixers | MLPs | norms | other (embedding, LM head, loss) | optimizer | step |",
              "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in result["results"]:
        if "error" in r:
            continue
        comps = r["breakdown"]["components"]
        mixers = ", ".join(f"{k.split(':', 1)[1]} {v['total_s']:.2f} ({v['per_layer_s']:.3f})"
                           for k, v in comps.items() if k.startswith("mixer:"))
        mlp, norm = comps.get("mlp", {}), comps.get("norm", {})
        lines.append(
            f"| {r['name']} | {r['seq_len']} | {mixers} | "
            f"{mlp.get('total_s', 0):.2f} ({mlp.get('per_layer_s', 0):.3f}) | "
            f"{norm.get('total_s', 0):.2f} | {comps['other']['total_s']:.2f} | {comps['optimizer']['total_s']:.2f} | "
            f"{r['breakdown']['wall_s']['step_s']:.2f} |")
    lines += ["", "Targets:", ""]
    for t in result["targets"]:
        verdict = {True: "met", False: "missed", None: "undecided"}[t["meets"]]
        verdict_cpu = {True: "met", False: "missed", None: "undecided"}[t["meets_cpu"]]
        lines.append(f"- {t['target']}: {_fmt(t['value'], '.3f')} — {verdict} (CPU-time ratio "
                     f"{_fmt(t['value_cpu'], '.3f')} — {verdict_cpu})")
    if not result["targets"]:
        lines.append("- none applicable (no BaseConv or sparse-hybrid row)")
    return "\n".join(lines) + "\n"


def main(argv=None):
    from bench.trainer_overhead import stdout_to_stderr

    ns = parse(argv)
    if ns._one:
        print(json.dumps(one(json.loads(ns._one))), flush=True)
        return None
    with stdout_to_stderr():
        result = run(ns)
    emit(result, ns.out, ns.md, markdown)
    return result


if __name__ == "__main__":
    main()

"""Checkpoint write and read time at a paper scale: our atomic save/load vs plain torch.save/torch.load.

    python -m bench.checkpoint [--config configs/neox/attention_360m.yml] [--rounds 2] [--dir DIR] [--out FILE]

One process, one gloo rank, the config's model on CPU in fp32 with ZeRO stage 0 (sequence 64, micro
batch 1, so one synthetic training step creates the Adam state quickly). "Ours" is
`training.checkpoint.save` (DeepSpeed's writer into `global_step<N>.incomplete`, barrier, config and
topology files, directory rename, atomic `latest`) and `training.checkpoint.load` (weights-only
reads, topology check, engine/optimizer/scheduler/RNG restore). The peer is the straightforward
thing: `torch.save({"module": ..., "optimizer": ...})` of the same state into one file, and
`torch.load(weights_only=True)` of it. "Unverified" is our save with DeepSpeed's plain writer and no
manifest: `manifest_cost` = ours / unverified − 1 is what the checksums and manifest.json cost (target
<= 10%). Rounds alternate the order; the page cache is not dropped, so reads are mostly from memory
and writes go to the page cache as well.

stdout carries only the JSON.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import cores, emit, loadavg, machine

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "neox" / "attention_360m.yml"
CPU_SETS = ["bf16={enabled: false}", "pipe_parallel_size=0", "zero_optimization={stage: 0}", "seq_length=64",
            "max_position_embeddings=64", "train_micro_batch_size_per_gpu=1", "train_batch_size=null",
            "gradient_accumulation_steps=1", "vocab_file=null", "merge_file=null", "vocab_size=50257"]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.checkpoint",
                                description="Checkpoint save/load time vs plain torch.save/torch.load (JSON on stdout).")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="model config (default: the 360M attention one)")
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                   help="extra replacements after the CPU ones")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory, removed after)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, metavar="FILE", help="also write the JSON here")
    return p.parse_args(argv)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def run(ns) -> dict:
    import logging
    import warnings

    import torch

    from bench.trainer_overhead import free_port, synthetic_batches

    threads = ns.threads or cores()
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))

    from neox_zoology.config import load
    from neox_zoology.parallel import setup as psetup
    from neox_zoology.parallel.cpu_compat import model_parallel_seed
    from neox_zoology.training import checkpoint
    from neox_zoology.training.engine import build_engine
    from neox_zoology.tokenizer import resolve_vocab
    from neox_zoology.training.loop import train_step

    work = Path(ns.dir) if ns.dir else Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    work.mkdir(parents=True, exist_ok=True)
    args = load([ns.config], sets=CPU_SETS + ns.sets, world_size=1)
    args.save = str(work / "ours")
    resolve_vocab(args)
    psetup.init_distributed("gloo")
    t_start, load_start = time.perf_counter(), loadavg()
    try:
        psetup.init_model_parallel(1, 1)
        model_parallel_seed(args.seed)
        engine = build_engine(args, None)
        batch = synthetic_batches(1, 1, args.seq_length, args.vocab_size, 0, torch.device("cpu"))
        train_step(engine, iter(batch), torch.device("cpu"))  # Adam state exists from here on
        params = sum(p.numel() for p in engine.module.parameters())
        opt = engine.zoo_optimizer
        peer_file = work / "plain.pt"
        times = {"ours_save": [], "unverified_save": [], "plain_save": [], "ours_load": [], "plain_load": []}
        cpu = {"ours_save": [], "unverified_save": []}  # process CPU time: steadier than wall on a busy machine
        ds_writer = engine.checkpoint_engine.save  # DeepSpeed's own, before checkpoint.save hashes

        def unverified_save(i):
            """checkpoint.save with DeepSpeed's plain writer and no manifest: the manifest's cost is the
            difference to ours_save."""
            shutil.rmtree(work / "ours", ignore_errors=True)
            hashing, writer = checkpoint.hashing_saves, engine.checkpoint_engine.save
            manifest = checkpoint.write_manifest
            checkpoint.hashing_saves, checkpoint.write_manifest = (lambda e: None), (lambda d, known: None)
            engine.checkpoint_engine.save = ds_writer
            try:
                t, c = time.perf_counter(), time.process_time()
                checkpoint.save(engine, args, i + 1)
                times["unverified_save"].append(time.perf_counter() - t)
                cpu["unverified_save"].append(time.process_time() - c)
            finally:
                checkpoint.hashing_saves, checkpoint.write_manifest = hashing, manifest
                engine.checkpoint_engine.save = writer

        def ours_save(i):
            shutil.rmtree(work / "ours", ignore_errors=True)
            t, c = time.perf_counter(), time.process_time()
            checkpoint.save(engine, args, i + 1)
            times["ours_save"].append(time.perf_counter() - t)
            cpu["ours_save"].append(time.process_time() - c)

        def plain_save(i):
            t = time.perf_counter()
            torch.save({"module": engine.module.state_dict(), "optimizer": opt.state_dict()}, peer_file)
            times["plain_save"].append(time.perf_counter() - t)

        def ours_load(i):
            t = time.perf_counter()
            checkpoint.load(engine, args.save, args)
            times["ours_load"].append(time.perf_counter() - t)

        def plain_load(i):
            t = time.perf_counter()
            state = torch.load(peer_file, weights_only=True)
            engine.module.load_state_dict(state["module"])
            opt.load_state_dict(state["optimizer"])
            times["plain_load"].append(time.perf_counter() - t)

        for i in range(ns.rounds):
            # ours_save always after unverified_save (both write "ours"), so ours_load reads a verified checkpoint
            saves = [unverified_save, ours_save, plain_save] if i % 2 == 0 else [plain_save, unverified_save, ours_save]
            for group in (saves, [ours_load, plain_load] if i % 2 == 0 else [plain_load, ours_load]):
                for fn in group:
                    fn(i)
                    print(f"bench.checkpoint: {fn.__name__} round {i}: {times[fn.__name__][-1]:.2f} s",
                          file=sys.stderr, flush=True)
        ours_bytes = _size(work / "ours" / checkpoint.tag_for(ns.rounds))
        plain_bytes = _size(peer_file)
    finally:
        psetup.destroy()
        if not ns.dir:
            shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "benchmark": "checkpoint",
        "config": os.path.relpath(ns.config, ROOT) if os.path.isabs(ns.config) else ns.config,
        "cpu_replacements": CPU_SETS + ns.sets,
        "parameters": params,
        "checkpoint_bytes": ours_bytes,
        "plain_file_bytes": plain_bytes,
        "save_s": med["ours_save"],
        "plain_save_s": med["plain_save"],
        "save_ratio": med["ours_save"] / med["plain_save"],
        "unverified_save_s": med["unverified_save"],
        "manifest_cost": med["ours_save"] / med["unverified_save"] - 1,
        "manifest_cost_cpu": statistics.median(cpu["ours_save"]) / statistics.median(cpu["unverified_save"]) - 1,
        "cpu_s": cpu,
        "targets": [{"target": "manifest (hashing while writing + manifest.json) <= 10% of the save time",
                     "value": med["ours_save"] / med["unverified_save"] - 1, "threshold": 0.10,
                     "meets": med["ours_save"] / med["unverified_save"] - 1 <= 0.10}],
        "load_s": med["ours_load"],
        "plain_load_s": med["plain_load"],
        "load_ratio": med["ours_load"] / med["plain_load"],
        "save_GB_per_s": ours_bytes / med["ours_save"] / 1e9,
        "times_s": times,
        "rounds": ns.rounds,
        "machine": {**machine(threads), "loadavg_1min_at_start": load_start, "loadavg_1min_at_end": loadavg()},
        "wall_s": time.perf_counter() - t_start,
    }


def main(argv=None) -> dict:
    ns = parse(argv)
    result = run(ns)
    emit(result, ns.out)
    return result


if __name__ == "__main__":
    main()

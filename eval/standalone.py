"""`python -m eval.ar_slice CONFIG... --load CKPT [--iteration N] --out results.json`

Evaluates the AR slice of any saved checkpoint with the same engine as training (run it under
`deepspeed --num_gpus N` with the checkpoint's TP x PP layout, or plainly for a 1-rank checkpoint).
CKPT is a save directory (its `latest`, or `global_step<N>` with --iteration) or a `global_step<N>`
directory itself. The `ar_eval` section of the config supplies bigram_counts, threshold, iters and
reference; the flags below override it.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.ar_slice", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", help="the run's YAML files (or its global_step<N>/configs/config.yml)")
    p.add_argument("--load", required=True, help="save directory or global_step<N> directory")
    p.add_argument("--iteration", type=int, default=None, help="evaluate global_step<N> (default: latest)")
    p.add_argument("--out", required=True, help="results JSON (a PNG plot is written beside it)")
    p.add_argument("--override", action="append", default=[], metavar="FILE")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets")
    p.add_argument("--bigram-counts", default=None, help="overrides ar_eval.bigram_counts")
    p.add_argument("--iters", type=int, default=None, help="overrides ar_eval.iters")
    p.add_argument("--threshold", type=int, default=None, help="overrides ar_eval.threshold")
    p.add_argument("--reference", default=None, help="overrides ar_eval.reference (an attention run's ar_slice.json)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def resolve_checkpoint(load: str, iteration: int | None) -> tuple[str, str]:
    """(save directory, tag) from --load/--iteration."""
    from eval.ar_slice import ARSliceError

    p = Path(load)
    if p.name.startswith("global_step") and p.is_dir() and iteration is None:
        return str(p.parent), p.name
    if iteration is not None:
        tag = f"global_step{iteration}"
    elif (p / "latest").exists():
        tag = (p / "latest").read_text().strip()
    else:
        raise ARSliceError(f"--load {load}: no 'latest' file there; pass a save directory, a global_step<N> "
                           f"directory, or --iteration N")
    if not (p / tag).is_dir():
        raise ARSliceError(f"--load {load}: checkpoint {p / tag} not found; check --load / --iteration")
    return str(p), tag


def run(ns) -> dict:
    from megatron.core import parallel_state

    from eval.hook import ArSliceHook
    from neox_zoology.config import validate_ar_eval, load
    from neox_zoology.data import BatchIterator, build_datasets
    from neox_zoology.parallel import setup as psetup
    from neox_zoology.parallel.cpu_compat import model_parallel_seed
    from eval.ar_slice import ARSliceError
    from neox_zoology.training import checkpoint
    from neox_zoology.training.engine import build_engine
    from neox_zoology.tokenizer import load_tokenizer, resolve_vocab

    args = load(ns.configs, ns.override, ns.sets)
    section = dict(args.ar_eval, enabled=True)
    for key, value in (("bigram_counts", ns.bigram_counts), ("iters", ns.iters), ("threshold", ns.threshold),
                       ("reference", ns.reference)):
        if value is not None:
            section[key] = value
    args.ar_eval = section
    validate_ar_eval(args, lambda k: "--bigram-counts/--iters/--threshold/--reference or the config")
    save_dir, tag = resolve_checkpoint(ns.load, ns.iteration)
    tokenizer = load_tokenizer(args)
    resolve_vocab(args, tokenizer)
    ckpt = Path(save_dir, tag)
    now = checkpoint.topology(args)  # evaluation loads weights only: TP and PP must match
    saved = checkpoint.read_checkpoint_json(ckpt / "configs" / "topology.json", "the parallel layout it was saved with")
    if (saved.get("tensor_parallel"), saved.get("pipe_parallel")) != (now["tensor_parallel"],
                                                                      now["pipe_parallel"]):
        raise ARSliceError(f"--load {ckpt}: saved with tensor_parallel {saved.get('tensor_parallel')}, pipe_parallel "
                           f"{saved.get('pipe_parallel')}; run the evaluation with that layout (model_parallel_size, "
                           f"pipe_parallel_size and as many ranks)")
    for notice in checkpoint.check_model(args, ckpt, finetune=False, what="--load"):
        print(f"note: {notice}", file=sys.stderr)

    if "RANK" not in os.environ:  # run without a launcher: a 1-rank group on a free port
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    psetup.init_distributed()
    topo = psetup.init_model_parallel(args.tp, args.pp)
    try:
        model_parallel_seed(args.seed)
        checkpoint.verified_tag(save_dir, tag, fallback=False, log=print, select=checkpoint.model_files_only)
        engine = build_engine(args, topo)
        checkpoint.weights_only_loading(engine.checkpoint_engine)  # as in training: no code in the files
        path, client = engine.load_checkpoint(save_dir, tag=tag, load_optimizer_states=False,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"{save_dir}/{tag}: the checkpoint could not be loaded")
        iteration = int(client.get("iteration", ns.iteration or 0))
        splits = build_datasets(args, tokenizer, eval_runs=1)
        if splits.valid is None:
            raise RuntimeError("the config has no validation data (split or valid_data_paths)")
        dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()

        def factory():
            return BatchIterator(splits.valid, args.train_micro_batch_size_per_gpu, args.gradient_accumulation_steps,
                                 dp_rank, dp_size, 0)

        hook = ArSliceHook(args, engine, factory, logger=None, tokenizer=tokenizer)
        return hook.evaluate(iteration, str(Path(save_dir, tag)), out_json=ns.out)  # rank 0 prints the summary
    finally:
        psetup.destroy()


def main(argv=None) -> int:
    import warnings

    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated")
    ns = parse(argv)
    from eval.ar_slice import ARSliceError
    from neox_zoology.config import ConfigError
    from neox_zoology.training.checkpoint import CheckpointError

    try:
        run(ns)
    except (ConfigError, ARSliceError, CheckpointError) as exc:
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0

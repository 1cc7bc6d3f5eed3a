"""Command line of train.py: `train.py CONFIG... [--override FILE] [--set key=value] [--dry-run]`."""
from __future__ import annotations

import argparse
import os
import sys


def parse(argv=None):
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train a Zoology architecture from GPT-NeoX YAML configs (launch with `deepspeed`).",
    )
    p.add_argument("configs", nargs="+", help="YAML files, merged (a key set in two files is an error)")
    p.add_argument("--override", action="append", default=[], metavar="FILE",
                   help="YAML whose keys replace the merged ones (e.g. a CPU-sized override)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="replace one key (value in YAML syntax), e.g. --set train_iters=20")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, build on the meta device, print parameters, FLOPs and the per-rank memory "
                        "plan (also as JSON), exit")
    p.add_argument("--world-size", type=int, default=None, metavar="N",
                   help="with --dry-run: plan memory for N ranks (default: the launcher's WORLD_SIZE, else "
                        "model_parallel_size x pipeline stages, i.e. one data-parallel replica)")
    p.add_argument("--summary-json", default=None, help="write first/last loss, checkpoint, throughput here")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def dry_run_world_size(ns) -> int:
    """The world size a dry run plans for: --world-size, else WORLD_SIZE (set by the launcher), else the
    smallest world the config runs on (model_parallel_size x pipeline stages: one data-parallel replica)."""
    from neox_zoology.config import ConfigError, merge_files

    if ns.world_size is not None:
        if ns.world_size < 1:
            raise ConfigError(f"--world-size {ns.world_size}: give a positive number of ranks")
        return ns.world_size
    if os.environ.get("WORLD_SIZE"):
        return int(os.environ["WORLD_SIZE"])
    raw, _ = merge_files(ns.configs, ns.override, ns.sets)
    tp, pp = raw.get("model_parallel_size", 1), raw.get("pipe_parallel_size", 0)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (tp, pp)):
        return 1  # validation names the bad value
    return max(1, tp) * max(1, pp)


def _report(msg: str) -> None:
    # Under the launcher every rank validates the same files; one line per problem per node is enough.
    if os.environ.get("LOCAL_RANK", "0") == "0":
        for line in str(msg).splitlines():
            print(f"config error: {line}", file=sys.stderr, flush=True)


def main(argv=None, after_save=()) -> int:
    """train.py: validate, plan (--dry-run) or train; `after_save` as in training.loop.run. Returns the exit code."""
    import warnings

    # DeepSpeed's ZeRO calls a torch.distributed API that torch has renamed; harmless, once per rank.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated")
    ns = parse(argv)
    from neox_zoology.config import ConfigError, check_launch, check_model_keys, check_paths, load, merge_files

    try:
        if ns.world_size is not None and not ns.dry_run:
            raise ConfigError("--world-size only goes with --dry-run; a training run takes its world size from "
                              "the launcher (deepspeed --num_gpus N ...)")
        check_model_keys(merge_files(ns.configs, ns.override, ns.sets)[0], ns.configs)
        world = dry_run_world_size(ns) if ns.dry_run else None
        args = load(ns.configs, ns.override, ns.sets, world_size=world)
        check_paths(args, need_data=not ns.dry_run)
        if not ns.dry_run:
            check_launch(args)
        from neox_zoology.training.loop import check_hooks, preflight

        check_hooks(args, after_save)
        _, plan = preflight(args, launch=not ns.dry_run)  # the same checks again inside the run, per rank
        if ns.dry_run:
            from neox_zoology.training import dryrun

            for notice in args.config_notes + plan.notices:
                print(f"note: {notice}")
            return dryrun.main(args)
    except ConfigError as exc:
        _report(str(exc))
        return 2
    from neox_zoology.training.checkpoint import CheckpointError
    from neox_zoology.training.loop import EXIT_PREEMPTED, EXIT_NONFINITE, NonFiniteError, run

    try:
        summary = run(args, summary_path=ns.summary_json, after_save=after_save)
    except ConfigError as exc:  # problems only a started run can see (e.g. an older checkpoint's model)
        _report(str(exc))
        return 2
    except CheckpointError as exc:
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"checkpoint error: {exc}", file=sys.stderr, flush=True)
        return 2
    except NonFiniteError as exc:
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"training stopped: {exc}", file=sys.stderr, flush=True)
        return EXIT_NONFINITE
    return EXIT_PREEMPTED if summary.get("preempted_at") else 0

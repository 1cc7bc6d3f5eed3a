"""Loading a checkpoint: the resume rules (`resume_plan`, checked before any process group starts), the
ranks' shared verification of the files against the manifest (with `load_fallback`, the newest older
checkpoint that verifies), and DeepSpeed's load with `weights_only=True`."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from neox_zoology.config import ConfigError
from neox_zoology.training.checkpoint.files import (MANIFEST, CheckpointError, complete_checkpoints, listing,
                                                    read_manifest, require_torch_engine, step_of, verify_files)
from neox_zoology.training.checkpoint.identity import check_model, check_topology
from neox_zoology.training.checkpoint.saving import set_rng_state


def checkpoint_globals() -> list:
    """The non-tensor classes our checkpoint files hold: DeepSpeed's (ZeRO optimizer states, loss scaler) and
    numpy's for the run's saved numpy RNG state."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address,
            np.dtype, np.ndarray, np._core.multiarray._reconstruct, type(np.dtype(np.uint32))]


def load_weights_only(path, map_location=None):
    """`torch.load(path, weights_only=True)` allowing `checkpoint_globals()` for this call only.

    Only the classes not already allowed process-wide are added (and removed again on return): torch's
    `safe_globals` context removes what it added on exit, which would also take away an allowance someone
    else registered for the whole process (megatron-core registers numpy's on import)."""
    allowed = set(map(id, torch.serialization.get_safe_globals()))
    extra = [g for g in checkpoint_globals() if id(g) not in allowed]
    with torch.serialization.safe_globals(extra):
        return torch.load(path, map_location=map_location, weights_only=True)


def weights_only_loading(checkpoint_engine) -> None:
    """Make DeepSpeed's torch checkpoint engine load with `weights_only=True` (it passes False): a
    checkpoint file can then hold tensors, containers, numbers and the few classes above, never code.
    A file that is not a whole checkpoint file is a CheckpointError naming it."""
    require_torch_engine(checkpoint_engine)

    def load(path: str, map_location=None):
        import pickle
        import re
        import zipfile

        try:
            return load_weights_only(path, map_location)
        except pickle.UnpicklingError as exc:
            found = re.search(r"GLOBAL (\S+)", str(exc))
            if found is None:
                raise CheckpointError(f"{path}: unreadable checkpoint file ({str(exc).splitlines()[0]}): it is "
                                      f"truncated or corrupted") from None
            raise RuntimeError(
                f"{path}: refused to load: the file references {found.group(1)}, "
                f"which is not checkpoint data (checkpoints load with weights_only=True, so a file cannot run "
                f"code). Use a checkpoint written by this project, or re-save the file's tensors"
            ) from None
        except (EOFError, zipfile.BadZipFile, RuntimeError, ValueError, OSError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(f"{path}: unreadable checkpoint file ({first}): it is truncated or "
                                  f"corrupted") from None

    checkpoint_engine.load = load


@dataclass
class ResumePlan:
    """What a run will load (None: a fresh start) and what to tell the user about it."""

    tag: str | None
    notices: list[str] = field(default_factory=list)


def _same_dir(a, b) -> bool:
    return bool(a and b) and os.path.realpath(a) == os.path.realpath(b)


def latest_tag(load_dir: Path) -> str:
    """The tag `latest` names, checked to be a complete checkpoint (ConfigError otherwise)."""
    latest = load_dir / "latest"
    try:
        tag = latest.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"load: {latest} is unreadable ({exc}); write the name of the checkpoint to resume "
                          f"from into it (e.g. global_step1000)") from None
    have = [p.name for p in complete_checkpoints(load_dir)]
    there = f" (complete checkpoints there: {', '.join(have[-5:])})" if have else " (no complete checkpoint there)"
    if not tag:
        raise ConfigError(f"load: {latest} is empty{there}; write the name of the checkpoint to resume from into it")
    if step_of(tag) is None:
        raise ConfigError(f"load: {latest} names {tag[:60]!r}, not a checkpoint (global_step<N>){there}; write the "
                          f"name of the checkpoint to resume from into it")
    if not (load_dir / tag / "configs" / "config.yml").exists():
        missing = "does not exist" if not (load_dir / tag).exists() else "is incomplete (no configs/config.yml)"
        raise ConfigError(f"load: {latest} names {tag}, which {missing}{there}; write an existing checkpoint's "
                          f"name into {latest}")
    return tag


def resume_plan(args) -> ResumePlan:
    """The checks of the resume rules (docs/checkpoints.md) that need only the files: what to load, or a
    ConfigError naming what is missing or inconsistent. Vocabulary must be resolved (padded_vocab_size)."""
    plan = ResumePlan(tag=None)
    auto = _same_dir(args.load, args.save)
    if args.load:
        load_dir = Path(args.load)
        has_any = load_dir.is_dir() and ((load_dir / "latest").exists() or any(
            step_of(p.name) is not None for p in load_dir.glob("global_step*")))
        if not has_any:
            if not auto:
                state = "does not exist" if not load_dir.exists() else (
                    "is not a folder" if not load_dir.is_dir() else "holds no checkpoint (no latest, no global_step*)")
                raise ConfigError(f"{args.sources.get('load', 'config')}: load: {load_dir} {state}; give the save "
                                  f"folder of the run to resume, or remove `load` to start a new run")
            plan.notices.append(f"load: {load_dir} holds no checkpoint yet: starting at iteration 0 (load == save, "
                                f"so later launches resume from there)")
        else:
            if not (load_dir / "latest").exists():
                have = [p.name for p in complete_checkpoints(load_dir)]
                raise ConfigError(
                    f"load: {load_dir} has checkpoints ({', '.join(have[-5:]) or 'none complete'}) but no `latest` "
                    f"file naming the one to resume from; write one of their names into {load_dir / 'latest'}")
            plan.tag = latest_tag(load_dir)
            ckpt = load_dir / plan.tag
            check_topology(args, ckpt)
            plan.notices += check_model(args, ckpt, finetune=args.finetune)
            step = step_of(plan.tag)
            if not args.finetune and step >= args.train_iters:
                plan.notices.append(f"load: {ckpt} is at iteration {step}, train_iters is {args.train_iters}: "
                                    f"nothing left to train (raise train_iters to continue)")
    if args.save and Path(args.save).is_dir() and not args.overwrite_checkpoints:
        theirs = [p.name for p in complete_checkpoints(args.save)]
        resuming_here = auto and plan.tag is not None and not args.finetune
        if theirs and not resuming_here:
            why = ("finetune starts again at iteration 0 and would replace them" if auto and args.finetune
                   else "this run did not load from there and would replace or mix with them")
            raise ConfigError(
                f"{args.sources.get('save', 'config')}: save: {args.save} holds checkpoints of another run "
                f"({', '.join(theirs[-3:])}); {why}. Choose a new save folder, resume that run with load: "
                f"{args.save}, or set overwrite_checkpoints: true")
    return plan


def verified_tag(load_dir: str, tag: str, fallback: bool, log, select=None) -> str:
    """Every rank verifies its share of the checkpoint's files (those `select(name)` accepts, default all)
    against the manifest; all agree. On a failure: with `fallback`, the newest older complete checkpoint
    that verifies; else CheckpointError."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    candidates = [tag] + [p.name for p in reversed(complete_checkpoints(load_dir)) if step_of(p.name) < step_of(tag)]
    first_problem = None
    for i, cand in enumerate(candidates):
        directory = Path(load_dir, cand)
        try:
            manifest = read_manifest(directory)
        except CheckpointError as exc:
            manifest, problems = None, [str(exc)]
        else:
            if manifest is None:
                if rank == 0:
                    log(f"load: {directory} has no {MANIFEST} (saved before checkpoints carried one): its files "
                        f"are not verified")
                problems = []
            else:
                names = sorted(n for n in manifest["files"] if select is None or select(n))
                problems = verify_files(directory, names[rank::world], manifest)
        everyone = [None] * world
        torch.distributed.all_gather_object(everyone, problems)
        problems = [p for ps in everyone for p in ps]
        if not problems:
            if i and rank == 0:
                log(f"load_fallback: {Path(load_dir, tag)} failed verification ({first_problem}); LOADING THE OLDER "
                    f"{directory} INSTEAD")
            return cand
        first_problem = first_problem or problems[0]
        if not fallback:
            raise CheckpointError(
                f"load: checkpoint {directory} failed verification: {listing(problems, 3)}. Restore the file(s), "
                f"point `latest` at an older checkpoint, or set load_fallback: true to load the newest one that "
                f"verifies")
    raise CheckpointError(f"load: no checkpoint in {load_dir} verifies (newest: {first_problem}); restore the "
                          f"files or start a new run")


def load(engine, load_dir: str, args=None, log=print) -> int:
    """Resume engine, optimizer, LR schedule and RNG from `latest` (after `resume_plan`'s checks and the
    manifest verification); returns the iteration (0 if nothing to load, or under finetune)."""
    if args is not None and not _same_dir(args.load, load_dir):
        import dataclasses

        args = dataclasses.replace(args, load=str(load_dir))
    plan = resume_plan(args) if args is not None else ResumePlan(
        tag=latest_tag(Path(load_dir)) if Path(load_dir, "latest").exists() else None)
    if plan.tag is None:
        return 0
    fallback = bool(args is not None and args.load_fallback)
    tag = verified_tag(load_dir, plan.tag, fallback, log)
    if tag != plan.tag and args is not None:  # the older checkpoint must also be this model
        check_topology(args, Path(load_dir, tag))
        check_model(args, Path(load_dir, tag), finetune=args.finetune)
    finetune = bool(args is not None and args.finetune)
    flag = lambda name: bool(args is not None and getattr(args, name, False))  # noqa: E731
    weights_only_loading(engine.checkpoint_engine)
    path, client = engine.load_checkpoint(
        load_dir, tag=tag, load_optimizer_states=not (finetune or flag("no_load_optim")),
        load_lr_scheduler_states=not (finetune or flag("override_lr_scheduler")), load_module_only=finetune)
    if path is None:
        raise CheckpointError(f"{Path(load_dir, tag)}: DeepSpeed found no checkpoint files to load there")
    engine.zoo_loaded = str(Path(load_dir, tag))
    if finetune:
        return 0
    if client.get("rng") is not None and not flag("no_load_rng"):
        set_rng_state(client["rng"])
    iteration = int(client["iteration"])
    if flag("override_lr_scheduler") and engine.lr_scheduler is not None:
        # this config's schedule (lr, warmup, decay), continued at the loaded iteration
        engine.lr_scheduler.last_epoch = iteration - 1
        engine.lr_scheduler.step()
    return iteration


def model_files_only(name: str) -> bool:
    """The files a weights-only load reads (not DeepSpeed's optimizer partitions)."""
    return "optim_states" not in name


def loaded_path(engine) -> str | None:
    """The checkpoint directory `load` loaded into `engine` (after a fallback, the older one)."""
    return getattr(engine, "zoo_loaded", None)


def last_verified(args, last_saved: str | None, loaded: str | None) -> str:
    """How the exit-3 message names the checkpoint to go back to."""
    if last_saved:
        return f"{last_saved} (saved by this run, with its manifest)"
    if loaded:
        return f"{loaded} (verified when this run loaded it)"
    return "none: this run saved no checkpoint and loaded none"

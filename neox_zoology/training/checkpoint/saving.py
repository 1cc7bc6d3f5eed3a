"""Saving a checkpoint on every rank: DeepSpeed writes into `global_step<N>.incomplete/` while each file is
hashed as it streams to disk; a failed write on any rank fails the save on every rank with `latest`
untouched; rank 0 then writes the config files and the manifest, renames the directory and replaces
`latest` atomically. Also the RNG state a checkpoint carries."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch
import yaml

from neox_zoology.io import atomic_write_text
from neox_zoology.training.checkpoint.files import (INCOMPLETE, MODEL_JSON, CheckpointError, hasher, prune,
                                                    remove_incomplete, require_torch_engine, tag_for,
                                                    write_manifest)
from neox_zoology.training.checkpoint.identity import model_identity, topology

def rng_state() -> dict:
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tracker.get_states() if tracker is not None and tracker.is_initialized() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import random as mrandom

    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if state.get("tracker") is not None and mrandom._CUDA_RNG_STATE_TRACKER is not None:
        mrandom._CUDA_RNG_STATE_TRACKER.set_states(state["tracker"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


class _HashingFile:
    """A binary file that hashes what passes through `write` (torch.save needs write and flush)."""

    def __init__(self, f):
        self.f, self.h, self.bytes = f, hasher(), 0

    def write(self, data) -> int:
        self.h.update(data)
        self.bytes += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


_written: dict[str, tuple[int, str]] = {}
"""absolute path -> (bytes, digest) of every checkpoint file this process wrote (cleared per save)."""
_write_errors: list[str] = []
"""Failed writes of the save in progress (disk full, ...): the save fails on every rank together."""


def hashing_saves(checkpoint_engine) -> None:
    """Make DeepSpeed's torch checkpoint engine hash each file while writing it, and record (not raise)
    a failed write, so that every rank still reaches DeepSpeed's own barriers and the save can fail on
    every rank at once."""
    if getattr(checkpoint_engine, "_zoo_hashing", False):
        return
    require_torch_engine(checkpoint_engine)
    zipfile = getattr(checkpoint_engine, "zipfile_serialization", True)

    def save(state_dict, path: str):
        try:
            with open(path, "wb") as f:
                out = _HashingFile(f)
                torch.save(state_dict, out, _use_new_zipfile_serialization=zipfile)
        except (OSError, RuntimeError) as exc:
            _write_errors.append(f"{path}: {_reason(exc)}")
            return
        _written[os.path.abspath(path)] = (out.bytes, out.h.hexdigest())

    checkpoint_engine.save = save
    checkpoint_engine._zoo_hashing = True


def _reason(exc: BaseException) -> str:
    import errno

    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "no space left on the device"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")


def save(engine, args, iteration: int) -> str:
    """Write `global_step<iteration>` (every rank calls this); CheckpointError on every rank if a write
    fails, the previous checkpoint and `latest` untouched."""
    save_dir = args.save
    tag = tag_for(iteration)
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        os.makedirs(save_dir, exist_ok=True)
        remove_incomplete(save_dir)
    identity = model_identity(args) if rank0 else None
    torch.distributed.barrier()
    hashing_saves(engine.checkpoint_engine)
    _written.clear()
    _write_errors.clear()
    try:
        engine.save_checkpoint(save_dir, tag=tag + INCOMPLETE,
                               client_state={"iteration": iteration, "rng": rng_state()}, save_latest=False)
    except (OSError, RuntimeError) as exc:  # a write outside the checkpoint engine (DeepSpeed's own files)
        _write_errors.append(f"{save_dir}: {_reason(exc)}")
    staging, final = Path(save_dir, tag + INCOMPLETE), Path(save_dir, tag)
    mine = {Path(p).relative_to(staging.resolve()).as_posix(): v for p, v in _written.items()
            if Path(p).is_relative_to(staging.resolve())}
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, {"written": mine, "errors": list(_write_errors)})
    errors = [e for g in gathered for e in g["errors"]]
    if not errors and rank0:
        try:
            cfg_dir = staging / "configs"
            cfg_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cfg_dir / "config.yml", yaml.safe_dump(args.to_dict(), sort_keys=True))
            atomic_write_text(cfg_dir / "topology.json", json.dumps(topology(args)))
            atomic_write_text(cfg_dir / MODEL_JSON, json.dumps(identity))
            write_manifest(staging, {k: v for g in gathered for k, v in g["written"].items()})
        except OSError as exc:
            errors.append(f"{staging}: {_reason(exc)}")
    verdict = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(verdict, errors)
    errors = [e for v in verdict for e in v]
    if errors:
        latest = Path(save_dir, "latest")
        previous = latest.read_text().strip() if latest.exists() else None
        raise CheckpointError(
            f"saving checkpoint {tag} failed: {errors[0]}. Nothing was renamed: "
            + (f"{Path(save_dir, previous)} (latest) is intact" if previous else "no earlier checkpoint exists")
            + f"; the partial {staging.name} is removed at the next start. Free space or fix {save_dir}, "
              f"then resume")
    if rank0:
        import shutil

        if final.exists():  # the same step saved again (e.g. after a resume): replace it whole
            if Path(save_dir, "latest").exists() and Path(save_dir, "latest").read_text().strip() == tag:
                atomic_write_text(Path(save_dir, "latest"), tag + INCOMPLETE)  # never name a half-deleted dir
            shutil.rmtree(final)
        os.replace(staging, final)
        atomic_write_text(Path(save_dir, "latest"), tag)
        if args.keep_last_n_checkpoints:
            prune(save_dir, args.keep_last_n_checkpoints)
    torch.distributed.barrier()
    return str(final)

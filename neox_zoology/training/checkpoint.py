"""Checkpoints through DeepSpeed, plus what DeepSpeed does not keep: iteration, RNG, the config.

Layout (GPT-NeoX's): `<save>/global_step<N>/...` written by DeepSpeed (per-layer files under the
pipeline engine), `<save>/global_step<N>/configs/config.yml` (the merged config), and `<save>/latest`.
`latest` moves only after every rank has finished writing (a barrier, then an atomic rename), so an
interrupted save never becomes the checkpoint a restart resumes from.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
import yaml


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


def tag_for(iteration: int) -> str:
    return f"global_step{iteration}"


def save(engine, args, iteration: int) -> str:
    save_dir = args.save
    tag = tag_for(iteration)
    engine.save_checkpoint(save_dir, tag=tag, client_state={"iteration": iteration, "rng": rng_state()},
                           save_latest=False)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        cfg_dir = Path(save_dir, tag, "configs")
        cfg_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(cfg_dir / "config.yml", yaml.safe_dump(args.to_dict(), sort_keys=True))
        _atomic_write(Path(save_dir, "latest"), tag)
        if args.keep_last_n_checkpoints:
            prune(save_dir, args.keep_last_n_checkpoints)
    torch.distributed.barrier()
    return str(Path(save_dir, tag))


def complete_checkpoints(save_dir) -> list[Path]:
    """Checkpoint directories whose save finished (the config is written after every rank's files)."""
    found = [p for p in Path(save_dir).glob("global_step*") if (p / "configs" / "config.yml").exists()]
    return sorted(found, key=lambda p: int(p.name[len("global_step"):]))


def prune(save_dir, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (never the one `latest` names)."""
    import shutil

    latest = Path(save_dir, "latest").read_text().strip()
    for old in complete_checkpoints(save_dir)[:-keep]:
        if old.name != latest:
            shutil.rmtree(old)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load(engine, load_dir: str) -> int:
    """Resume engine, optimizer, LR schedule and RNG from `latest`; returns the iteration (0 if none)."""
    if not Path(load_dir, "latest").exists():
        return 0
    path, client = engine.load_checkpoint(load_dir, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"{load_dir}: checkpoint {Path(load_dir, 'latest').read_text()!r} could not be loaded")
    if client.get("rng") is not None:
        set_rng_state(client["rng"])
    return int(client["iteration"])

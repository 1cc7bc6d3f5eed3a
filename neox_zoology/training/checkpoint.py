"""Checkpoints through DeepSpeed, plus what DeepSpeed does not keep: iteration, RNG, the config.

Layout (GPT-NeoX's): `<save>/global_step<N>/...` written by DeepSpeed (per-layer files under the
pipeline engine), `<save>/global_step<N>/configs/config.yml` (the merged config), and `<save>/latest`.

Atomicity: every rank writes into `<save>/global_step<N>.incomplete/`; after a barrier (every rank
done), rank 0 writes the config there, renames the directory to `global_step<N>` and then atomically
replaces `latest`. A rank killed mid-save leaves only an `.incomplete` directory, which no loader
reads and the next save or start removes, so `latest` always names a whole checkpoint. (`save` and
`load` paths must be on a filesystem all ranks share, as for GPT-NeoX.)
"""
from __future__ import annotations

import json
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


INCOMPLETE = ".incomplete"


def tag_for(iteration: int) -> str:
    return f"global_step{iteration}"


def remove_incomplete(save_dir) -> list[str]:
    """Delete leftovers of interrupted saves (rank 0 only, while no save is running)."""
    import shutil

    latest = Path(save_dir, "latest")
    keep = latest.read_text().strip() if latest.exists() else None
    removed = []
    for p in Path(save_dir).glob(f"global_step*{INCOMPLETE}"):
        if p.name == keep:  # a complete staging directory `latest` names during a same-step re-save
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    return removed


def save(engine, args, iteration: int) -> str:
    save_dir = args.save
    tag = tag_for(iteration)
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        remove_incomplete(save_dir)
    torch.distributed.barrier()
    engine.save_checkpoint(save_dir, tag=tag + INCOMPLETE,
                           client_state={"iteration": iteration, "rng": rng_state()}, save_latest=False)
    torch.distributed.barrier()  # every rank's files are written
    if rank0:
        import shutil

        staging, final = Path(save_dir, tag + INCOMPLETE), Path(save_dir, tag)
        cfg_dir = staging / "configs"
        cfg_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(cfg_dir / "config.yml", yaml.safe_dump(args.to_dict(), sort_keys=True))
        _atomic_write(cfg_dir / "topology.json", json.dumps(topology(args)))
        if final.exists():  # the same step saved again (e.g. after a resume): replace it whole
            if Path(save_dir, "latest").exists() and Path(save_dir, "latest").read_text().strip() == tag:
                _atomic_write(Path(save_dir, "latest"), tag + INCOMPLETE)  # never name a half-deleted dir
            shutil.rmtree(final)
        os.replace(staging, final)
        _atomic_write(Path(save_dir, "latest"), tag)
        if args.keep_last_n_checkpoints:
            prune(save_dir, args.keep_last_n_checkpoints)
    torch.distributed.barrier()
    return str(Path(save_dir, tag))


def complete_checkpoints(save_dir) -> list[Path]:
    """Checkpoint directories whose save finished (renamed from `.incomplete` after every rank wrote)."""
    found = [p for p in Path(save_dir).glob("global_step*")
             if p.name[len("global_step"):].isdigit() and (p / "configs" / "config.yml").exists()]
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


def _deepspeed_globals() -> list:
    """The non-tensor classes DeepSpeed puts in its checkpoint files (ZeRO optimizer states)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def weights_only_loading(checkpoint_engine) -> None:
    """Make DeepSpeed's torch checkpoint engine load with `weights_only=True` (it passes False): a
    checkpoint file can then hold tensors, containers, numbers and the few classes above, never code."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(checkpoint_engine) is not TorchCheckpointEngine:
        raise RuntimeError(f"unexpected DeepSpeed checkpoint engine {type(checkpoint_engine).__name__}: "
                           f"only the torch engine is supported (remove checkpoint engine options from the config)")

    def load(path: str, map_location=None):
        import pickle
        import re

        try:
            with torch.serialization.safe_globals(_deepspeed_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            found = re.search(r"GLOBAL (\S+)", str(exc))
            raise RuntimeError(
                f"{path}: refused to load: the file references {found.group(1) if found else 'a Python object'}, "
                f"which is not checkpoint data (checkpoints load with weights_only=True, so a file cannot run "
                f"code). Use a checkpoint written by this project, or re-save the file's tensors"
            ) from None

    checkpoint_engine.load = load


def topology(args) -> dict:
    return {"tensor_parallel": args.tp, "pipe_parallel": args.pp, "data_parallel": args.dp,
            "zero_stage": int(args.zero_optimization.get("stage", 0))}


def check_topology(args, load_dir: str, tag: str) -> None:
    """Resuming needs the same TP and PP; a different DP size only without ZeRO partitioning (stage 0),
    where every rank holds the whole optimizer state. Anything else fails here, before training."""
    from neox_zoology.config import ConfigError

    path = Path(load_dir, tag, "configs", "topology.json")
    if not path.exists():
        return
    saved, now = json.loads(path.read_text()), topology(args)
    changed = [k for k in ("tensor_parallel", "pipe_parallel", "zero_stage") if saved.get(k) != now[k]]
    if saved.get("data_parallel") != now["data_parallel"] and (saved.get("zero_stage") or now["zero_stage"]):
        changed.append("data_parallel")
    if changed:
        def show(t):
            return ", ".join(f"{k} {t.get(k)}" for k in now)

        raise ConfigError(
            f"load: {Path(load_dir, tag)} was saved with {show(saved)}; this run has {show(now)}. "
            f"{', '.join(changed)} differ: resume with the saved sizes (a different data-parallel size works only "
            f"with zero_optimization.stage 0 on both sides), or start a new run without `load`"
        )


def load(engine, load_dir: str, args=None) -> int:
    """Resume engine, optimizer, LR schedule and RNG from `latest`; returns the iteration (0 if none)."""
    if not Path(load_dir, "latest").exists():
        return 0
    if args is not None:
        check_topology(args, load_dir, Path(load_dir, "latest").read_text().strip())
    weights_only_loading(engine.checkpoint_engine)
    path, client = engine.load_checkpoint(load_dir, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"{load_dir}: checkpoint {Path(load_dir, 'latest').read_text()!r} could not be loaded")
    if client.get("rng") is not None:
        set_rng_state(client["rng"])
    return int(client["iteration"])

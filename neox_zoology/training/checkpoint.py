"""Checkpoints through DeepSpeed, plus what DeepSpeed does not keep: iteration, RNG, the config, the
model's identity and a manifest of every file.

Layout (GPT-NeoX's): `<save>/global_step<N>/...` written by DeepSpeed (per-layer files under the
pipeline engine), `<save>/global_step<N>/configs/{config.yml, topology.json, model.json}`,
`<save>/global_step<N>/manifest.json` and `<save>/latest`.

Atomicity: every rank writes into `<save>/global_step<N>.incomplete/`; after every rank is done, rank 0
writes the config files and the manifest there, renames the directory to `global_step<N>` and then
atomically replaces `latest`. A rank killed mid-save leaves only an `.incomplete` directory, which no
loader reads and the next save or start removes, so `latest` always names a whole checkpoint. (`save`
and `load` paths must be on a filesystem all ranks share, as for GPT-NeoX.)

Verification: each file DeepSpeed writes is hashed (xxh3-128) as its bytes stream to disk, so the
manifest costs no second read; on load the ranks share the files out, re-hash them and agree on a
verdict before DeepSpeed reads anything. A mismatch or a truncated file is one line naming the file;
with `load_fallback: true` the newest older checkpoint that verifies is loaded instead, said loudly.

Resume rules (`resume_plan`, checked before any process group starts): `load` must name a folder with a
loadable checkpoint, except for the auto-resume pattern `load == save` on a folder with no checkpoint
yet (a fresh start, said); a run never writes into a `save` folder holding checkpoints it did not load
from unless `overwrite_checkpoints: true`; the saved model must be the configured one (`model.json`),
`finetune: true` allowing changes that keep every parameter's name and shape.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from neox_zoology.config import ConfigError
from neox_zoology.io import atomic_write_text

INCOMPLETE = ".incomplete"
MANIFEST = "manifest.json"
HASH = "xxh3_128"
MODEL_JSON = "model.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted or written, phrased for the user (one line)."""


# ------------------------------------------------------------------------------------------- RNG state

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


# ------------------------------------------------------------------------------------------ directories

def tag_for(iteration: int) -> str:
    return f"global_step{iteration}"


def step_of(tag: str) -> int | None:
    rest = tag[len("global_step"):] if tag.startswith("global_step") else ""
    return int(rest) if rest.isdigit() else None


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


def complete_checkpoints(save_dir) -> list[Path]:
    """Checkpoint directories whose save finished (renamed from `.incomplete` after every rank wrote)."""
    found = [p for p in Path(save_dir).glob("global_step*")
             if step_of(p.name) is not None and (p / "configs" / "config.yml").exists()]
    return sorted(found, key=lambda p: step_of(p.name))


def prune(save_dir, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (never the one `latest` names)."""
    import shutil

    latest = Path(save_dir, "latest").read_text().strip()
    for old in complete_checkpoints(save_dir)[:-keep]:
        if old.name != latest:
            shutil.rmtree(old)


# --------------------------------------------------------------------------------- hashing and manifest

def _hasher():
    import xxhash

    return xxhash.xxh3_128()


class _HashingFile:
    """A binary file that hashes what passes through `write` (torch.save needs write and flush)."""

    def __init__(self, f):
        self.f, self.h, self.bytes = f, _hasher(), 0

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
    _torch_engine(checkpoint_engine)
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


def file_digest(path: Path) -> tuple[int, str]:
    h, n = _hasher(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
            n += len(block)
    return n, h.hexdigest()


def write_manifest(directory: Path, known: dict[str, tuple[int, str]]) -> dict:
    """manifest.json of every file under `directory` (digests from `known` where the writer recorded
    them, else read back), written last."""
    files = {}
    for p in sorted(directory.rglob("*")):
        if not p.is_file() or p.name == MANIFEST:
            continue
        rel = p.relative_to(directory).as_posix()
        size, digest = known.get(rel) or file_digest(p)
        if size != p.stat().st_size:  # recorded while writing, changed since: read it again
            size, digest = file_digest(p)
        files[rel] = {"bytes": size, HASH: digest}
    manifest = {"format": 1, "hash": HASH, "files": files}
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def verify_files(directory: Path, names: list[str], manifest: dict) -> list[str]:
    """Problems (one line each) of `names` against the manifest."""
    problems = []
    for rel in names:
        entry, p = manifest["files"][rel], directory / rel
        if not p.is_file():
            problems.append(f"{p} is missing")
            continue
        size = p.stat().st_size
        if size != entry["bytes"]:
            problems.append(f"{p} is {size} bytes, the manifest says {entry['bytes']} (truncated or replaced)")
        elif file_digest(p)[1] != entry[HASH]:
            problems.append(f"{p} does not match its checksum in {directory / MANIFEST} (corrupted)")
    return problems


def read_manifest(directory: Path) -> dict | None:
    path = directory / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        manifest["files"].items()
        return manifest
    except (ValueError, KeyError, AttributeError, TypeError):
        raise CheckpointError(f"{path} is unreadable (not the manifest this project writes): the checkpoint "
                              f"cannot be verified") from None


# ----------------------------------------------------------------------------------------- model identity

def model_keys(args) -> dict:
    """The config values that define the model's function, resolved (padded vocabulary, MLP width, one
    layer type per layer, each type's section with its defaults)."""
    keys = {k: getattr(args, k) for k in (
        "num_layers", "hidden_size", "num_attention_heads", "norm", "activation", "ffn_hidden_size", "mlp_width",
        "use_bias_in_mlp", "use_bias_in_norms", "bias_gelu_fusion",
        "use_bias_in_attn_linear", "pos_emb", "rotary_pct", "rotary_emb_base", "no_weight_tying", "gpt_j_residual",
        "padded_vocab_size")}
    keys["norm_epsilon"] = args.layernorm_epsilon if args.norm == "layernorm" else args.rms_norm_epsilon
    if args.pos_emb == "learned":
        keys["max_position_embeddings"] = args.max_position_embeddings
    keys["layer_types"] = list(args.layer_types)
    keys["mixers"] = {t: args.mixer_args(t) for t in sorted(set(args.layer_types))}
    return json.loads(json.dumps(keys))  # plain JSON values, comparable with a saved copy


def parameter_shapes(args) -> dict[str, list[int]]:
    """Name -> shape of every parameter of the whole model (TP = PP = 1 view), built on the meta device."""
    from neox_zoology.model.gpt import SequentialGPT
    from neox_zoology.training.engine import model_config

    world, tp = args.world_size, args.model_parallel_size
    args.world_size, args.model_parallel_size = 1, 1
    try:
        with torch.device("meta"):
            model = SequentialGPT(args, model_config(args, perform_initialization=False))
    finally:
        args.world_size, args.model_parallel_size = world, tp
    return {name: list(p.shape) for name, p in model.named_parameters()}


def model_identity(args) -> dict:
    """What `configs/model.json` records (computed once per Args)."""
    cached = getattr(args, "_model_identity", None)
    if cached is None:
        cached = {"model": model_keys(args), "seq_length": args.seq_length, "parameters": parameter_shapes(args)}
        args._model_identity = cached
    return cached


def _show(v) -> str:
    text = json.dumps(v) if not isinstance(v, str) else v
    return text if len(text) <= 80 else text[:77] + "..."


def model_differences(saved: dict, now: dict) -> list[str]:
    """'key: saved X, this run Y' for each model key that differs (mixer arguments per type)."""
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k), now.get(k)
        if k == "mixers" and isinstance(a, dict) and isinstance(b, dict):
            for t in sorted(set(a) & set(b)):
                for arg in sorted(set(a[t]) | set(b[t])):
                    if a[t].get(arg) != b[t].get(arg):
                        out.append(f"{t}.{arg}: saved {_show(a[t].get(arg))}, this run {_show(b[t].get(arg))}")
            continue
        if k == "layer_types" and isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            changed = [f"{i}: {x} -> {y}" for i, (x, y) in enumerate(zip(a, b)) if x != y]
            if changed:
                out.append(f"layer types differ at layer {', '.join(changed[:4])}"
                           + (f" (+{len(changed) - 4} more)" if len(changed) > 4 else ""))
            continue
        if a != b:
            out.append(f"{k}: saved {_show(a)}, this run {_show(b)}")
    return out


def shape_differences(saved: dict, now: dict) -> list[str]:
    out = [f"parameter {n}: saved {saved[n]}, this run {now[n]}" for n in sorted(set(saved) & set(now))
           if saved[n] != now[n]]
    out += [f"parameter {n} is only in the checkpoint" for n in sorted(set(saved) - set(now))]
    out += [f"parameter {n} is not in the checkpoint" for n in sorted(set(now) - set(saved))]
    return out


def _listing(items: list[str], n: int = 6) -> str:
    return "; ".join(items[:n]) + (f"; and {len(items) - n} more" if len(items) > n else "")


def check_model(args, ckpt: Path, finetune: bool, what: str = "load") -> list[str]:
    """Refuse a checkpoint of another model (ConfigError listing the differences); returns notices
    (a changed seq_length; under finetune, the weight-preserving changes)."""
    path = ckpt / "configs" / MODEL_JSON
    saved = read_checkpoint_json(path, "the model this checkpoint holds")
    now = model_identity(args)
    notices = []
    if saved.get("seq_length") != now["seq_length"]:
        notices.append(f"{what}: {ckpt} was trained at seq_length {saved.get('seq_length')}; this run uses "
                       f"{now['seq_length']}")
    keys = model_differences(saved.get("model", {}), now["model"])
    shapes = shape_differences(saved.get("parameters", {}), now["parameters"])
    if finetune:
        if shapes:
            raise ConfigError(f"{what}: {ckpt} holds other parameter shapes than this config builds "
                              f"({_listing(shapes)}); finetune keeps weights as they are, so the shapes must match")
        if keys:
            notices.append(f"finetune: the model differs from {ckpt} in ways that keep every weight: "
                           f"{_listing(keys, 10)}")
        return notices
    if keys or shapes:
        raise ConfigError(
            f"{what}: {ckpt} holds another model than this config builds: {_listing(keys or shapes)}. Resume "
            f"with the saved model's settings (its configs/config.yml), or set finetune: true to start a new run "
            f"from these weights (only changes that keep every weight's shape)")
    return notices


def read_checkpoint_json(path: Path, what: str) -> dict:
    if not path.exists():
        raise ConfigError(f"{path} is missing: without it {what} cannot be checked; the checkpoint is incomplete "
                          f"(copy the file back from where the checkpoint came from)")
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a mapping")
        return data
    except ValueError as exc:
        raise ConfigError(f"{path} is unreadable ({exc}): {what} cannot be checked; restore the file") from None


# ------------------------------------------------------------------------------------------------ saving

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


# ----------------------------------------------------------------------------------------------- loading

def _deepspeed_globals() -> list:
    """The non-tensor classes DeepSpeed puts in its checkpoint files (ZeRO optimizer states)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _torch_engine(checkpoint_engine) -> None:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if not isinstance(checkpoint_engine, TorchCheckpointEngine):
        raise RuntimeError(f"unexpected DeepSpeed checkpoint engine {type(checkpoint_engine).__name__}: "
                           f"only the torch engine is supported (remove checkpoint engine options from the config)")


def weights_only_loading(checkpoint_engine) -> None:
    """Make DeepSpeed's torch checkpoint engine load with `weights_only=True` (it passes False): a
    checkpoint file can then hold tensors, containers, numbers and the few classes above, never code.
    A file that is not a whole checkpoint file is a CheckpointError naming it."""
    _torch_engine(checkpoint_engine)

    def load(path: str, map_location=None):
        import pickle
        import re
        import zipfile

        try:
            with torch.serialization.safe_globals(_deepspeed_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)
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


def topology(args) -> dict:
    return {"tensor_parallel": args.tp, "pipe_parallel": args.pp, "data_parallel": args.dp,
            "zero_stage": int(args.zero_optimization.get("stage", 0))}


def check_topology(args, ckpt: Path) -> None:
    """Resuming needs the same TP and PP; a different DP size only without ZeRO partitioning (stage 0),
    where every rank holds the whole optimizer state. Anything else fails here, before training."""
    saved, now = read_checkpoint_json(ckpt / "configs" / "topology.json", "the parallel layout it was saved with"), topology(args)
    changed = [k for k in ("tensor_parallel", "pipe_parallel", "zero_stage") if saved.get(k) != now[k]]
    if saved.get("data_parallel") != now["data_parallel"] and (saved.get("zero_stage") or now["zero_stage"]):
        changed.append("data_parallel")
    if changed:
        def show(t):
            return ", ".join(f"{k} {t.get(k)}" for k in now)

        raise ConfigError(
            f"load: {ckpt} was saved with {show(saved)}; this run has {show(now)}. "
            f"{', '.join(changed)} differ: resume with the saved sizes (a different data-parallel size works only "
            f"with zero_optimization.stage 0 on both sides), or start a new run without `load`"
        )


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
    """The checks of the resume rules (module docstring) that need only the files: what to load, or a
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
                f"load: checkpoint {directory} failed verification: {_listing(problems, 3)}. Restore the file(s), "
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

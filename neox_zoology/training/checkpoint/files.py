"""The files of a checkpoint directory: names (`global_step<N>`, the `.incomplete` staging directory,
`latest`), which directories hold complete checkpoints, and `manifest.json`, every file's size and
xxh3-128 digest, written last and verified before anything is loaded."""
from __future__ import annotations

import json
from pathlib import Path

from neox_zoology.config import ConfigError
from neox_zoology.io import atomic_write_text

INCOMPLETE = ".incomplete"
MANIFEST = "manifest.json"
HASH = "xxh3_128"
MODEL_JSON = "model.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted or written, phrased for the user (one line)."""


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


def hasher():
    import xxhash

    return xxhash.xxh3_128()


def file_digest(path: Path) -> tuple[int, str]:
    h, n = hasher(), 0
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


def listing(items: list[str], n: int = 6) -> str:
    return "; ".join(items[:n]) + (f"; and {len(items) - n} more" if len(items) > n else "")


def require_torch_engine(checkpoint_engine) -> None:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if not isinstance(checkpoint_engine, TorchCheckpointEngine):
        raise RuntimeError(f"unexpected DeepSpeed checkpoint engine {type(checkpoint_engine).__name__}: "
                           f"only the torch engine is supported (remove checkpoint engine options from the config)")

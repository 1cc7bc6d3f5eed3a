"""Checkpoints through DeepSpeed, plus what DeepSpeed does not keep: iteration, RNG, the config, the
model's identity and a manifest of every file.

Layout (GPT-NeoX's): `<save>/global_step<N>/...` written by DeepSpeed, `<save>/global_step<N>/configs/
{config.yml, topology.json, model.json}`, `<save>/global_step<N>/manifest.json` and `<save>/latest`.
Invariants: `latest` always names a whole checkpoint (ranks write into `global_step<N>.incomplete/`,
renamed only after every rank is done); every file is verified against the manifest before DeepSpeed
reads it; a run never loads another model (`model.json`) or writes into a `save` folder holding
checkpoints it did not load from. Modules: `files` (names, manifest), `identity` (model and layout
checks), `saving`, `loading` (resume rules, verification, weights-only load). The full rules:
docs/checkpoints.md.
"""
from __future__ import annotations

from neox_zoology.training.checkpoint.files import (CheckpointError, file_digest, read_checkpoint_json,
                                                    remove_incomplete, tag_for, write_manifest)
from neox_zoology.training.checkpoint.identity import check_model, topology
from neox_zoology.training.checkpoint.loading import (last_verified, load, loaded_path, model_files_only, resume_plan,
                                                      verified_tag, weights_only_loading)
from neox_zoology.training.checkpoint.saving import hashing_saves, save

__all__ = ["CheckpointError", "check_model", "file_digest", "hashing_saves", "last_verified", "load", "loaded_path",
           "model_files_only", "read_checkpoint_json", "remove_incomplete", "resume_plan", "save", "tag_for",
           "topology", "verified_tag", "weights_only_loading", "write_manifest"]

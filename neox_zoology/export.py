"""`python -m neox_zoology.export CKPT OUT`: a checkpoint (any TP / PP layout) as a portable folder.

OUT/model.safetensors holds every weight at full size (TP shards and pipeline stages merged); OUT/config.json
holds the run's config, the model identity (configs/model.json) and the layers' plain extra states (e.g. a
sparse layer's selection seed). `neox_zoology.inference.load(OUT)` reads it with no DeepSpeed engine and
no process group; the logits equal the checkpoint's.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def export(ckpt, out) -> Path:
    """Write the export of checkpoint folder `ckpt` into `out` (created; existing export files replaced)."""
    import torch
    from safetensors.torch import save_file

    from neox_zoology import inference
    from neox_zoology.inference.loading import EXPORT_CONFIG, EXPORT_FORMAT, EXPORT_WEIGHTS
    from neox_zoology.io import atomic_path, atomic_write_text

    model = inference.load(ckpt)
    state = model.gpt.state_dict()
    tensors = {k: v.detach().contiguous() for k, v in state.items() if torch.is_tensor(v)}
    extra = {k: v for k, v in state.items() if not torch.is_tensor(v) and isinstance(v, dict)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / EXPORT_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": EXPORT_FORMAT})
    config = {"format": EXPORT_FORMAT, "source": model.source, "config": model.raw_config,
              "identity": model.identity, "extra_state": extra}
    atomic_write_text(out / EXPORT_CONFIG, json.dumps(config, indent=1, default=str))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m neox_zoology.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="save directory (its `latest`) or a global_step<N> directory")
    p.add_argument("out", help="output folder (model.safetensors + config.json)")
    ns = p.parse_args(argv)
    from neox_zoology.inference import LoadError

    try:
        out = export(ns.checkpoint, ns.out)
    except (LoadError, OSError, ValueError) as exc:
        print(f"export: {exc}", file=sys.stderr)
        return 2
    print(f"exported {ns.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

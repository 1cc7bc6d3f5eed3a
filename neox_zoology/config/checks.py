"""Checks outside the config's own values, run before any process starts: the machine (fp16 needs CUDA),
the model keys are given, the tokenizer and data files exist, the directories the run writes are writable."""
from __future__ import annotations

import math
import os
from pathlib import Path

from neox_zoology.config.args import ARG_RULES, Args
from neox_zoology.config.schema import ConfigError
from neox_zoology.config.validate import DATA_LISTS, ar_eval_file_problem, eval_tasks_path_problem


def check_launch(args: Args) -> None:
    """What only a real run needs (a dry run plans on the meta device): fp16 needs CUDA."""
    if args.dtype_name == "fp16" and not _cuda_available():
        raise ConfigError(
            f"{args.sources.get('fp16', args.sources.get('precision', 'config'))}: fp16 needs CUDA (DeepSpeed has no "
            f"fp16 on CPU); run with --override configs/neox/neox_cpu_override.yml (fp32) or set bf16 on this machine"
        )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


MODEL_KEYS = ("num_layers", "hidden_size", "num_attention_heads")


def check_model_keys(raw: dict, paths) -> None:
    """GPT-NeoX refuses a run without the model's shape; so does this stack (instead of a default model)."""
    if not any(k in raw for k in MODEL_KEYS):
        raise ConfigError(f"{', '.join(map(str, paths))}: no model keys ({', '.join(MODEL_KEYS)}); add a model config "
                          f"file before this one, e.g. train.py configs/neox/baseconv_360m.yml {paths[-1]}")


def writable_problem(path: str) -> str | None:
    """Why the directory `path` cannot be written, or None: it is a writable directory, or the nearest
    existing ancestor is one (so it can be created). Nothing is created."""
    p = Path(path).absolute()
    try:
        if p.exists():
            if not p.is_dir():
                return f"{p} exists and is not a directory"
            return None if os.access(p, os.W_OK | os.X_OK) else f"directory {p} is not writable"
        ancestor = p.parent
        while not ancestor.exists():
            ancestor = ancestor.parent
    except OSError as exc:
        return f"{p} cannot be checked ({exc.strerror or exc})"
    if not ancestor.is_dir():
        return f"{ancestor} is a file, so {p} cannot be created"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{ancestor} is not writable, so {p} cannot be created"
    return None


def missing_data_fix(args: Args, prefix: str) -> str:
    """How to get a missing dataset: the preprocessing command that writes `prefix` with the run's tokenizer,
    or how to point the run at other data."""
    out = prefix[: -len("_text_document")] if prefix.endswith("_text_document") else prefix
    tok = f"--tokenizer-type {args.tokenizer_type}"
    tok += f" --vocab-file {args.vocab_file}" if args.vocab_file else ""
    tok += f" --merge-file {args.merge_file}" if args.merge_file else ""
    return (f"preprocess it there (python -m tokenization.preprocess --input JSONL_FILES --output-prefix {out} "
            f"{tok} --append-eod; README 'Training on the Pile'), or train on other data by adding a data config "
            f"after this one (data_path or train_data_paths; it replaces these data keys)")


def check_paths(args: Args, need_data: bool = True) -> None:
    """Before anything starts: tokenizer files exist, the directories the run writes can be written and, for
    training (the dry run skips data), every data prefix is a whole .bin/.idx pair that `split` divides."""
    for key in ("vocab_file", "merge_file"):
        p = getattr(args, key)
        if p and not Path(p).exists():
            if not need_data and args.vocab_size is not None:  # a dry run plans from vocab_size
                args.config_notes.append(f"{key}: {p} not found; the plan uses vocab_size {args.vocab_size} "
                                         f"(a launch needs the file)")
                continue
            raise ConfigError(f"{args.sources.get(key, 'config')}: {key}: file {p} not found; put the tokenizer "
                              f"file there (README 'Training on the Pile' for GPT-2's) or fix the path")
    for key, rule in ARG_RULES.items():
        if rule.writable and getattr(args, key):
            problem = writable_problem(getattr(args, key))
            if problem:
                raise ConfigError(f"{args.sources.get(key, 'config')}: {key}: {problem}; give a directory this user "
                                  f"can write")
    tasks_problem = eval_tasks_path_problem(args)
    if tasks_problem:
        if not need_data:
            args.config_notes.append(f"{tasks_problem.split(';')[0]} (a launch needs it)")
        else:
            raise ConfigError(f"{args.sources.get('eval_tasks_include_path', 'config')}: {tasks_problem}")
    problem = ar_eval_file_problem(args)  # its bigram counts are made from the data: checked after it
    if not need_data:
        if problem:
            args.config_notes.append(f"{problem.split(';')[0]} (a launch needs it)")
        return
    prefixes = []
    if args.data_path:
        prefixes.append(("data_path", args.data_path))
    for key, _ in DATA_LISTS:
        prefixes += [(key, p) for p in getattr(args, key) or []]
    if not prefixes:
        raise ConfigError("no training data: set data_path (one .bin/.idx prefix) or train_data_paths")
    from neox_zoology.data import check_indexed_dataset, check_split

    for key, prefix in prefixes:
        for ext in (".bin", ".idx"):
            if not Path(prefix + ext).exists():
                raise ConfigError(f"{args.sources.get(key, 'config')}: {key}: {prefix}{ext} not found; "
                                  f"{missing_data_fix(args, prefix)}")
        check_indexed_dataset(prefix)  # whole and consistent, before any process starts
    if args.data_path:
        check_split(args)  # no used part of the split is empty
    if problem:
        raise ConfigError(f"{args.sources.get('ar_eval', 'config')}: {problem}")


def pad_vocab(vocab_size: int, multiple: int, tp: int) -> int:
    m = multiple * tp
    return int(math.ceil(vocab_size / m) * m)

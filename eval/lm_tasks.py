"""The `eval_tasks` evaluation run after each checkpoint save: lm-evaluation-harness tasks on the weights
just saved.

    hook = LmTasksHook(args, engine, valid_iterator_factory, logger, tokenizer=tokenizer)  # once
    hook(iteration, checkpoint_dir)                                 # after checkpoint.save(...), every rank

Rank 0 loads the checkpoint folder into one process (`neox_zoology.inference.load`, on the CPU, as
`python -m neox_zoology.harness` does) and runs each task on its own through `neox_zoology.harness.evaluate`,
so that a failing task (an unknown name, missing data, an error inside lm-eval) logs one line and the
others still run. It writes `<checkpoint_dir>/eval_tasks.json` and the numeric metrics to tensorboard
(`eval_tasks/<task>/<metric>`). The other ranks wait at a barrier; training then goes on, whatever failed.
Keys: eval_tasks, eval_tasks_include_path, eval_tasks_limit (docs/config-keys.md).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from neox_zoology.io import atomic_write_json

RESULTS = "eval_tasks.json"


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


class LmTasksHook:
    """After-save hook of training.loop.run: the `eval_tasks` lm-eval tasks at each checkpoint."""

    config_key = "eval_tasks"

    def __init__(self, args, engine=None, valid_iterator_factory=None, logger=None, tokenizer=None):
        self.args = args
        self.tasks = list(args.eval_tasks or [])
        self.include_path = list(args.eval_tasks_include_path or [])
        self.limit = args.eval_tasks_limit
        self.logger = logger
        self.tokenizer = tokenizer
        self.batch_size = max(1, int(args.train_micro_batch_size_per_gpu))

    @property
    def enabled(self) -> bool:
        return bool(self.tasks)

    def __call__(self, iteration: int, checkpoint_dir: str | None = None) -> dict | None:
        """Evaluate on rank 0; returns the eval_tasks.json document there (None elsewhere, or when disabled)."""
        if not self.enabled or not checkpoint_dir:
            return None
        doc = None
        if _rank() == 0:
            try:
                doc = self.evaluate(iteration, checkpoint_dir)
            except Exception as exc:  # noqa: BLE001 - training goes on whatever the evaluation does
                self._info(f"eval_tasks at iteration {iteration}: failed ({_one_line(exc)}); training continues")
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.barrier()
        return doc

    def evaluate(self, iteration: int, checkpoint_dir: str) -> dict:
        from neox_zoology import harness, inference

        t0 = time.perf_counter()
        model = inference.load(checkpoint_dir)
        tokenizer = self.tokenizer
        if tokenizer is None:
            from neox_zoology.tokenizer import build_tokenizer

            tokenizer = build_tokenizer(self.args.tokenizer_type, self.args.vocab_file, self.args.merge_file)
        doc = {"iteration": iteration, "checkpoint": str(checkpoint_dir), "tasks": self.tasks,
               "include_path": self.include_path, "limit": self.limit, "results": {}, "n-samples": {}, "failed": {}}
        for task in self.tasks:
            try:
                res = harness.evaluate(model, tokenizer, [task], self.include_path, limit=self.limit,
                                       batch_size=self.batch_size)
            except Exception as exc:  # noqa: BLE001 - one task's failure must not stop the others or training
                doc["failed"][task] = _one_line(exc)
                self._info(f"eval_tasks: task {task} at iteration {iteration} failed ({doc['failed'][task]}); "
                           f"training continues")
                continue
            doc["results"].update(res["results"])
            doc["n-samples"].update(res.get("n-samples", {}))
        doc["seconds"] = time.perf_counter() - t0
        atomic_write_json(Path(checkpoint_dir) / RESULTS, doc)
        self._report(iteration, doc, Path(checkpoint_dir) / RESULTS)
        return doc

    def _report(self, iteration: int, doc: dict, path: Path) -> None:
        values, shown = {}, []
        for task, metrics in doc["results"].items():
            numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for metric, v in numbers.items():
                name = metric[:-len(",none")] if metric.endswith(",none") else metric.replace(",", "_")
                values[f"{task}/{name}"] = v
            shown.append(f"{task}: " + ", ".join(f"{k.split(',')[0]} {v:.4g}" for k, v in numbers.items()
                                                 if "stderr" not in k))
        if self.logger is not None and values:
            self.logger.scalars(iteration, values, prefix="eval_tasks")
        failed = f"; failed: {', '.join(doc['failed'])}" if doc["failed"] else ""
        self._info(f"eval_tasks at iteration {iteration}: {' | '.join(shown) or 'no results'}{failed} "
                   f"(wrote {path}, {doc['seconds']:.1f} s)")

    def _info(self, msg: str) -> None:
        if self.logger is not None:
            self.logger.info(msg)
        else:
            print(msg, flush=True)

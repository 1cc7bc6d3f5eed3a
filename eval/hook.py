"""The AR-slice evaluation run after each checkpoint save (and on demand), through the training engine.

    hook = ArSliceHook(args, engine, valid_iterator_factory, logger, tokenizer=tokenizer)  # once
    ...
    result = hook(iteration, checkpoint_dir)                           # after checkpoint.save(...)

`valid_iterator_factory()` returns a fresh iterator of this data-parallel rank's validation
micro-batches `(tokens, (labels, loss_mask))` (the same batches each call, so steps compare), or None
when the run has no validation data (the hook then reports that as its failure). Every
rank calls the hook (the evaluation is collective). It evaluates `ar_eval.iters` global batches: the
plain engine runs the model directly; the pipeline engine runs `eval_batch` with a loss function
that, on the last stage, turns the vocab-parallel logits into per-token NLL (no logits gather) and
adds them to the slice sums. The sums are all-reduced once; rank 0 writes
`<checkpoint_dir>/ar_slice.json`, `<checkpoint_dir>/ar_slice.png` and tensorboard scalars.

A failure is logged with its traceback and the hook returns None (training goes on) unless
`ar_eval.strict: true`. `ar_eval.timeout` (seconds) stops the evaluation between batches (all ranks
agree on when); the results are then marked `truncated`.
"""
from __future__ import annotations

import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from eval import ar_slice
from neox_zoology.io import atomic_write_json
from neox_zoology.training.engine import is_pipe


class FailedOnAnotherRank(RuntimeError):
    pass


def _tp_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0


def _with_tokens(batches):
    """(tokens, (labels, mask)) -> (tokens, (labels, mask, tokens)): the last stage sees the bigram context."""
    for tokens, (labels, mask) in batches:
        yield tokens, (labels, mask, tokens)


class ArSliceHook:
    """After-save hook of training.loop.run: the AR slice of the validation batches at each checkpoint."""

    config_key = "ar_eval"

    def __init__(self, args, engine, valid_iterator_factory, logger=None, tokenizer=None):
        self.args = args
        self.cfg = dict(args.ar_eval)
        self.engine = engine
        self.factory = valid_iterator_factory
        self.logger = logger
        self.tokenizer = tokenizer
        self.counts = None
        self.reference = None
        self.previous = None  # (iteration, document) of the last evaluation, overlaid on the plot
        self.last_seconds = None

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.get("enabled"))

    # ------------------------------------------------------------------ entry point
    def __call__(self, iteration: int, checkpoint_dir: str | None = None, force: bool = False) -> dict | None:
        """Evaluate now; returns the ar_slice.json document (every rank), or None if disabled or failed."""
        if not (self.enabled or force):
            return None
        try:
            return self.evaluate(iteration, checkpoint_dir)
        except Exception as exc:
            if self.cfg.get("strict"):
                raise
            msg = (f"AR-slice evaluation at iteration {iteration} failed; training continues "
                   f"(set ar_eval.strict: true to stop instead):\n{traceback.format_exc()}")
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            if rank == 0:
                self._info(msg)
            elif not isinstance(exc, FailedOnAnotherRank):  # the rank that failed reports its own traceback
                print(f"[rank {rank}] {msg}", flush=True)
            return None

    # ------------------------------------------------------------------ evaluation
    def _load_inputs(self):
        if self.counts is None:
            vocab = getattr(self.args, "vocab_size", None)
            self.counts = ar_slice.load_bigram_counts(self.cfg["bigram_counts"], expected_vocab_size=vocab,
                                                      expected_tokenizer=self.tokenizer)
        if self.cfg.get("reference") and self.reference is None:
            self.reference = ar_slice.read_reference(self.cfg["reference"])

    def evaluate(self, iteration: int, checkpoint_dir: str | None, out_json: str | None = None) -> dict:
        t0 = time.perf_counter()
        self._load_inputs()
        error = None
        try:
            sums, batches, truncated = self.slice_sums()
        except Exception as exc:  # noqa: BLE001 - every rank must learn of it before the collective below
            error = exc
        failed = torch.tensor([0.0 if error is None else 1.0], dtype=torch.float64)
        torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
        if error is not None:
            raise error
        if failed.item() > 0:
            raise FailedOnAnotherRank("the AR-slice evaluation failed on another rank (that rank printed its traceback)")
        sums = self._all_reduce(sums)
        doc = ar_slice.summarize(
            sums, self.cfg["threshold"], iteration=iteration, checkpoint=checkpoint_dir, batches=batches,
            truncated=truncated, bigram_counts=str(self.cfg["bigram_counts"]), layer_types=list(self.args.layer_types),
        )
        if self.reference is not None:
            doc["reference"] = str(self.cfg["reference"])
            doc["gap"] = ar_slice.gap_attribution(doc, self.reference)
        self.last_seconds = time.perf_counter() - t0
        doc["seconds"] = self.last_seconds
        if torch.distributed.get_rank() == 0:
            self._write(doc, iteration, checkpoint_dir, out_json)
        self.previous = (iteration, doc)
        return doc

    def slice_sums(self) -> tuple[ar_slice.SliceSums, int, bool]:
        """This rank's contribution: the sums on the last pipeline stage's TP rank 0, zeros elsewhere."""
        sums = ar_slice.SliceSums()
        engine = self.engine
        iters = int(self.cfg["iters"])
        deadline = None if self.cfg.get("timeout") is None else time.perf_counter() + float(self.cfg["timeout"])
        batches = self.factory()
        if batches is None:
            raise ar_slice.ARSliceError(
                "ar_eval: there is no validation data to evaluate; give `split` a validation part or set "
                "valid_data_paths (or set ar_eval.enabled: false)")
        it = _with_tokens(batches)
        pipe = is_pipe(engine)
        counts, threshold = self.counts, int(self.cfg["threshold"])
        from neox_zoology.model.gpt import token_nll

        # The masks and bucketed sums are numpy work on the host. With the model on a GPU a background
        # worker does them (in order) while the GPU runs the next micro-batch; on a CPU-only machine the
        # host is the compute device, so they run inline. Only per-token NLL leaves the model.
        worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ar_slice") if torch.cuda.is_available() else None
        pending = []

        errors: list[BaseException] = []

        def accumulate(nll, tokens, labels, mask):
            # never raise inside the engine's schedule (a pipeline stage that stops mid-batch leaves the
            # others waiting): keep the first error and raise it after the batches
            if errors:
                return
            try:
                sums.add(nll, ar_slice.token_slices(tokens, labels, counts, threshold), mask)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        def add(logits, labels_mask_tokens):
            labels, mask, tokens = labels_mask_tokens
            nll = token_nll(logits, labels)
            job = (accumulate, nll.detach().double().cpu().numpy(), tokens.cpu().numpy(), labels.cpu().numpy(),
                   mask.cpu().numpy())
            if worker is not None:
                pending.append(worker.submit(*job))
            else:
                job[0](*job[1:])
            m = mask.float()
            return (nll * m).sum() / m.sum().clamp(min=1.0)

        try:
            last, done, truncated = self._run_batches(engine, pipe, iters, it, add, deadline)
        finally:
            if worker is not None:
                worker.shutdown(wait=True)
        for job in pending:
            job.result()
        if errors:
            raise errors[0]  # e.g. a token outside the counts' vocabulary
        if not (last and _tp_rank() == 0):
            sums = ar_slice.SliceSums()
        return sums, done, truncated

    def _run_batches(self, engine, pipe: bool, iters: int, it, add, deadline) -> tuple[bool, int, bool]:
        """`iters` global batches through the engine with `add` as the loss: (last stage?, batches, truncated)."""
        done, truncated = 0, False
        if pipe:
            module = engine.module
            saved = module.loss_fn
            module.loss_fn = add
            try:
                for _ in range(iters):
                    engine.eval_batch(data_iter=it)
                    done += 1
                    if done < iters and self._over_time(deadline):
                        truncated = True
                        break
            finally:
                module.loss_fn = saved
            last = engine.is_last_stage()
        else:
            was_training = engine.training
            engine.eval()
            device = next(engine.module.parameters()).device
            try:
                with torch.no_grad():
                    for _ in range(iters):
                        for _ in range(engine.gradient_accumulation_steps()):
                            tokens, (labels, mask, tok) = next(it)
                            add(engine(tokens.to(device)), (labels.to(device), mask.to(device), tok))
                        done += 1
                        if done < iters and self._over_time(deadline):
                            truncated = True
                            break
            finally:
                engine.train(was_training)
            last = True
        return last, done, truncated

    @staticmethod
    def _over_time(deadline) -> bool:
        """All ranks agree: stop when any rank is past the deadline (checked after each global batch)."""
        if deadline is None:
            return False
        flag = torch.tensor([1.0 if time.perf_counter() > deadline else 0.0], dtype=torch.float64)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item() > 0)

    @staticmethod
    def _all_reduce(sums: ar_slice.SliceSums) -> ar_slice.SliceSums:
        v = torch.from_numpy(sums.vector())
        torch.distributed.all_reduce(v)
        return ar_slice.SliceSums.from_vector(v.numpy())

    # ------------------------------------------------------------------ outputs (rank 0)
    def _write(self, doc: dict, iteration: int, checkpoint_dir: str | None, out_json: str | None = None) -> None:
        if out_json:
            json_path = Path(out_json)
            png_path = json_path.with_suffix(".png")
        else:
            out_dir = Path(checkpoint_dir) if checkpoint_dir else Path(self.args.save or ".") / f"global_step{iteration}"
            json_path, png_path = out_dir / "ar_slice.json", out_dir / "ar_slice.png"
        atomic_write_json(json_path, doc)
        overlays = []
        if self.reference is not None:
            overlays.append(("reference", self.reference))
        previous = self.previous or self._previous_on_disk(iteration, checkpoint_dir)
        if previous is not None and previous[0] != iteration:
            overlays.append((f"step {previous[0]}", previous[1]))
        try:
            from eval.plot import plot_ar_slice

            plot_ar_slice(doc, png_path, overlays=overlays, title=f"iteration {iteration}")
        except Exception:  # noqa: BLE001 - a plotting problem must not lose the numbers
            self._info(f"AR-slice plot failed (the JSON is written):\n{traceback.format_exc()}")
        if self.logger is not None:
            values = {
                "ppl_all": doc["all"]["ppl"], "ppl_ar_hits": doc["ar_hits"]["ppl"], "ppl_other": doc["other"]["ppl"],
                "nll_all": doc["all"]["nll"], "nll_ar_hits": doc["ar_hits"]["nll"], "nll_other": doc["other"]["nll"],
                "ar_hit_fraction": doc["ar_hit_fraction"],
            }
            if doc.get("gap") and doc["gap"]["share"] is not None:
                values["gap_share_ar_hits"] = doc["gap"]["share"]
            self.logger.scalars(iteration, values, prefix="ar_slice")
        self._info(ar_slice.format_summary(doc) + f"\n  wrote {json_path} and {png_path.name} ({doc['seconds']:.1f} s)")

    @staticmethod
    def _previous_on_disk(iteration: int, checkpoint_dir: str | None):
        """(step, document) of the newest earlier global_step<M>/ar_slice.json beside this checkpoint
        (after a restart the in-memory previous result is gone)."""
        if not checkpoint_dir:
            return None
        found = []
        for p in Path(checkpoint_dir).parent.glob("global_step*/ar_slice.json"):
            step = p.parent.name[len("global_step"):]
            if step.isdigit() and int(step) < iteration:
                found.append((int(step), p))
        if not found:
            return None
        step, path = max(found)
        try:
            return step, ar_slice.read_reference(path)
        except ar_slice.ARSliceError:
            return None

    def _info(self, msg: str) -> None:
        if self.logger is not None:
            self.logger.info(msg)
        elif not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print(msg, flush=True)



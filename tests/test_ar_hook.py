"""The AR-slice hook through the training engine: TP/PP/DP equal TP=1, it matches a plain validation
pass, it writes its files after a checkpoint, failures are contained unless strict, and the CLI."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from dist import run_ranks
from eval import ar_slice
from neox_zoology.config import build_args
from neox_zoology.io import atomic_write_json
from tokenization import bigrams


@pytest.fixture(scope="module")
def bigram_file(tiny_corpus, tmp_path_factory):
    """The AR slice's counts for the tiny corpus as the runs below split it ("90,10,0"): counted by
    tokenization.bigrams over the training documents, for the bigrams of the validation documents."""
    from neox_zoology.tokenizer import tokenizer_identity
    from neox_zoology.tokenizer import build_tokenizer

    tok = build_tokenizer("SPMTokenizer", tiny_corpus["tokenizer"], None)
    train, valid, _ = bigrams.split_documents(tiny_corpus["data_prefix"], "90,10,0")
    path = tmp_path_factory.mktemp("bigrams") / "bigrams.npz"
    bigrams.save_bigram_counts(path, bigrams.count_bigrams([train], [valid], tokenizer=tokenizer_identity(tok)))
    return str(path)


def counts_file(path, vocab_size: int) -> str:
    """A counts file of one bigram, (0, 1), over a vocabulary of `vocab_size` tokens."""
    bigrams.save_bigram_counts(path, bigrams.BigramCounts.from_arrays([1], [1], vocab_size))
    return str(path)


def _hook_after_save(rank, raw, world, strict_counts=None):
    """What loop.run does around a checkpoint: build, save at iteration 2, call the hook; plus a plain
    validation-loss pass over the same batches for comparison."""
    import torch
    from megatron.core import parallel_state

    from eval.hook import ArSliceHook
    from neox_zoology.data import BatchIterator, build_datasets
    from neox_zoology.parallel import setup as psetup
    from neox_zoology.parallel.cpu_compat import model_parallel_seed
    from neox_zoology.training import checkpoint
    from neox_zoology.training.engine import build_engine
    from neox_zoology.tokenizer import load_tokenizer, resolve_vocab
    from neox_zoology.training.loop import eval_loss
    from neox_zoology.training.metrics import Logger

    args = build_args(raw, world_size=world)
    psetup.init_distributed()
    topo = psetup.init_model_parallel(args.tp, args.pp)
    try:
        model_parallel_seed(args.seed)
        tokenizer = load_tokenizer(args)
        resolve_vocab(args, tokenizer)
        engine = build_engine(args, topo)
        splits = build_datasets(args, tokenizer, eval_runs=1)
        dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()

        def factory():
            return BatchIterator(splits.valid, args.train_micro_batch_size_per_gpu, args.gradient_accumulation_steps,
                                 dp_rank, dp_size, 0)

        logger = Logger(args, torch.distributed.get_rank())
        hook = ArSliceHook(args, engine, factory, logger, tokenizer=tokenizer)
        ckpt = checkpoint.save(engine, args, 2)
        doc = hook(2, ckpt)
        vloss = eval_loss(engine, factory(), args.ar_eval["iters"], torch.device("cpu"))
        logger.close()
        return doc, vloss, ckpt
    finally:
        psetup.destroy()


def hook_raw(tiny_raw, bigram_file, tmp_path, **over):
    return tiny_raw(save=str(tmp_path / "ckpt"), tensorboard_dir=str(tmp_path / "tb"),
                    ar_eval={"enabled": True, "bigram_counts": bigram_file, "iters": 2}, **over)


_REFERENCE: dict = {}


def tp1_reference(tiny_raw, bigram_file, tmp_path):
    """The TP=1, PP=0, DP=1 result (computed once per module)."""
    if "doc" not in _REFERENCE:
        raw = hook_raw(tiny_raw, bigram_file, tmp_path / "ref", gradient_accumulation_steps=2)
        _REFERENCE["doc"] = run_ranks(_hook_after_save, 1, raw, 1)[0][0]
    return _REFERENCE["doc"]


def same_slices(a, b, tol=1e-5):
    for name in ("all", "ar_hits", "other"):
        assert a[name]["tokens"] == b[name]["tokens"], name
        assert a[name]["nll"] == pytest.approx(b[name]["nll"], abs=tol), name
    np.testing.assert_allclose(a["sums"], b["sums"], rtol=1e-5, atol=1e-4)


def test_hook_writes_json_plot_and_scalars_and_matches_a_validation_pass(tiny_raw, bigram_file, tmp_path):
    raw = hook_raw(tiny_raw, bigram_file, tmp_path)
    doc, vloss, ckpt = run_ranks(_hook_after_save, 1, raw, 1)[0]
    assert Path(ckpt).name == "global_step2"
    written = json.loads((Path(ckpt) / "ar_slice.json").read_text())
    assert written["iteration"] == 2 and written["batches"] == 2 and not written["truncated"]
    assert (Path(ckpt) / "ar_slice.png").stat().st_size > 1000
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    # 2 batches x micro batch 2 x 32 tokens, every token scored (no eod masking)
    assert doc["all"]["tokens"] == 2 * 2 * 32
    assert doc["all"]["nll"] == pytest.approx(vloss, abs=1e-5)  # the same NLL as the plain validation pass
    assert 0 < doc["ar_hits"]["tokens"] < doc["all"]["tokens"]  # code repeats itself: there are AR hits
    assert doc["ar_hits"]["tokens"] + doc["other"]["tokens"] == doc["all"]["tokens"]
    assert doc["ar_hits"]["nll"] < doc["other"]["nll"] or doc["ar_hits"]["nll"] > 0


@pytest.mark.parametrize("layout", [
    {"model_parallel_size": 2, "world": 2},
    {"pipe_parallel_size": 2, "world": 2},
    {"pipe_parallel_size": 2, "model_parallel_size": 2, "world": 4},
    {"gradient_accumulation_steps": 1, "world": 2},  # DP=2 sees the same global batches
], ids=["tp2", "pp2", "tp2pp2", "dp2"])
def test_hook_under_tp_pp_dp_equals_tp1(tiny_raw, bigram_file, tmp_path, layout):
    layout = dict(layout)
    world = layout.pop("world")
    ref = tp1_reference(tiny_raw, bigram_file, tmp_path)
    raw = hook_raw(tiny_raw, bigram_file, tmp_path / "par", **{"gradient_accumulation_steps": 2, **layout})
    for doc, _, _ in run_ranks(_hook_after_save, world, raw, world):  # every rank returns the reduced result
        same_slices(doc, ref)


def test_a_failing_hook_is_logged_and_training_goes_on_unless_strict(tiny_raw, tmp_path, capfd):
    wrong = counts_file(tmp_path / "wrong_vocab.npz", vocab_size=1000)
    raw = tiny_raw(save=str(tmp_path / "ckpt"), ar_eval={"enabled": True, "bigram_counts": str(wrong), "iters": 1})
    doc, vloss, ckpt = run_ranks(_hook_after_save, 1, raw, 1)[0]
    assert doc is None and vloss > 0 and not (Path(ckpt) / "ar_slice.json").exists()
    out = capfd.readouterr().out
    assert "AR-slice evaluation at iteration 2 failed; training continues" in out
    assert "Traceback" in out and "vocabulary of 1000 tokens but the model's tokenizer has 512" in out
    strict = {**raw, "ar_eval": {**raw["ar_eval"], "strict": True}}
    with pytest.raises(AssertionError, match="ARSliceError: ar_eval.bigram_counts: .*vocabulary of 1000 tokens"):
        run_ranks(_hook_after_save, 1, strict, 1)


def test_timeout_stops_after_the_first_batch_and_marks_the_result(tiny_raw, bigram_file, tmp_path):
    raw = hook_raw(tiny_raw, bigram_file, tmp_path)
    raw["ar_eval"] = {**raw["ar_eval"], "iters": 5, "timeout": 1e-6}
    doc, _, _ = run_ranks(_hook_after_save, 1, raw, 1)[0]
    assert doc["truncated"] is True and doc["batches"] == 1 and doc["all"]["tokens"] == 2 * 32


def test_reference_run_gives_gap_attribution_and_overlay(tiny_raw, bigram_file, tmp_path):
    first = hook_raw(tiny_raw, bigram_file, tmp_path / "a")
    ref_doc, _, ref_ckpt = run_ranks(_hook_after_save, 1, first, 1)[0]
    other = hook_raw(tiny_raw, bigram_file, tmp_path / "b", attention_config=[[["baseconv"], "all"]])
    other["ar_eval"] = {**other["ar_eval"], "reference": str(tmp_path / "a" / "ckpt")}
    doc, _, ckpt = run_ranks(_hook_after_save, 1, other, 1)[0]
    gap = json.loads((Path(ckpt) / "ar_slice.json").read_text())["gap"]
    assert gap == doc["gap"]
    assert gap["overall_nll_gap"] == pytest.approx(doc["all"]["nll"] - ref_doc["all"]["nll"])
    assert gap == ar_slice.gap_attribution(doc, ref_doc)


def _run_loop(rank, raw, world, after_save=None):
    from eval.hook import ArSliceHook
    from neox_zoology.training.loop import run

    return run(build_args(raw, world_size=world), after_save=(ArSliceHook,) if after_save is None else after_save)


def test_training_loop_runs_the_hook_after_each_checkpoint(tiny_raw, bigram_file, tmp_path):
    raw = hook_raw(tiny_raw, bigram_file, tmp_path, train_iters=4, checkpoint_factor=2, pipe_parallel_size=2)
    with_hook = run_ranks(_run_loop, 2, raw, 2)[0]
    without = run_ranks(_run_loop, 2, {**raw, "ar_eval": {"enabled": False}, "save": str(tmp_path / "off")}, 2)[0]
    assert with_hook["losses"] == without["losses"]  # evaluating does not perturb training
    for step in (2, 4):
        doc = json.loads((tmp_path / "ckpt" / f"global_step{step}" / "ar_slice.json").read_text())
        assert doc["iteration"] == step and doc["all"]["tokens"] > 0


def _cli(rank, argv):
    from eval.ar_slice import main

    return main(argv)


def test_standalone_cli_evaluates_a_saved_checkpoint(tiny_raw, bigram_file, tmp_path, capfd):
    raw = hook_raw(tiny_raw, bigram_file, tmp_path)
    doc, _, ckpt = run_ranks(_hook_after_save, 1, raw, 1)[0]
    out = tmp_path / "cli.json"
    argv = [str(Path(ckpt) / "configs" / "config.yml"), "--load", str(tmp_path / "ckpt"), "--out", str(out),
            "--set", "tensorboard_dir=null"]
    assert run_ranks(_cli, 1, argv) == [0]  # `python -m eval.ar_slice ...` in a fresh 1-rank process
    cli = json.loads(out.read_text())
    assert cli["iteration"] == 2 and out.with_suffix(".png").exists()
    same_slices(cli, doc)
    printed = capfd.readouterr().out
    assert "AR slice at iteration 2" in printed and "AR hits" in printed
    bad = argv[:-2] + ["--bigram-counts", str(tmp_path / "none.npz")]
    assert run_ranks(_cli, 1, bad) == [2]
    err = capfd.readouterr().err
    assert "ar_eval.bigram_counts: file" in err and "none.npz not found" in err
    assert run_ranks(_cli, 1, argv[:1] + ["--load", str(tmp_path), "--out", str(out)]) == [2]
    assert "no 'latest' file there" in capfd.readouterr().err
    # checkpoint files load weights-only here too: a file that references code is refused
    import torch

    from test_reliability import _Payload

    states = Path(ckpt) / "mp_rank_00_model_states.pt"
    torch.save({**torch.load(states, weights_only=True), "note": _Payload(tmp_path / "executed")}, states)
    assert run_ranks(_cli, 1, argv) == [2]  # the manifest catches the changed file before anything reads it
    assert "mp_rank_00_model_states.pt is" in capfd.readouterr().err
    (Path(ckpt) / "manifest.json").unlink()  # as a checkpoint saved without one
    with pytest.raises(AssertionError, match="mp_rank_00_model_states.pt: refused to load: the file references io.open"):
        run_ranks(_cli, 1, argv)
    assert not (tmp_path / "executed").exists()


def test_module_entry_point_shows_usage():
    r = subprocess.run([sys.executable, "-m", "eval.ar_slice", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "--load" in r.stdout and "--iteration" in r.stdout


def _bench(rank, out):
    from bench import ar_eval

    return ar_eval.main(["--iters", "1", "--rounds", "2", "--table-size", "1000", "--out", out])


def test_benchmark_reports_the_hook_cost_against_a_plain_validation_pass(tmp_path, capfd):
    out = tmp_path / "bench.json"
    (r,) = run_ranks(_bench, 1, str(out), timeout=120)
    assert json.loads(capfd.readouterr().out) == json.loads(out.read_text()) == json.loads(json.dumps(r))
    assert len(r["plain_s"]) == len(r["hook_s"]) == 2 and r["plain_s_median"] > 0 and r["hook_s_median"] > 0
    assert r["ratio"] == pytest.approx(r["hook_s_median"] / r["plain_s_median"])
    assert r["target_ratio"] == 1.1 and r["target_met"] == (r["ratio"] <= 1.1)
    assert r["nll_abs_diff_vs_plain"] < 1e-5  # both passes scored the same tokens with the same model
    assert r["tokens_per_pass"] == 8 * 128 and r["host_work_s_min"] > 0
    assert r["malloc"].startswith("keep (MALLOC_TRIM_THRESHOLD_=")  # measured in a child with the allocator env


def test_a_failure_on_the_last_pipeline_stage_does_not_hang_the_other_stage(tiny_raw, tmp_path, capfd):
    small = counts_file(tmp_path / "small_vocab.npz", vocab_size=100)  # token ids >= 100 are outside it
    raw = tiny_raw(save=str(tmp_path / "ckpt"), pipe_parallel_size=2,
                   ar_eval={"enabled": True, "bigram_counts": str(small), "iters": 2})
    results = run_ranks(_hook_after_save_unchecked_vocab, 2, raw, 2, timeout=120)
    assert [doc for doc, _, _ in results] == [None, None]  # both stages returned (no hang), training goes on
    out = capfd.readouterr().out
    assert "failed on another rank" in out  # rank 0 (first stage) says where to look
    assert "[rank 1] AR-slice evaluation at iteration 2 failed" in out and "outside the 100-token vocabulary" in out


def _hook_after_save_unchecked_vocab(rank, raw, world):
    """As `_hook_after_save`, but the counts' vocabulary size is not checked up front, so the failure
    happens inside the pipeline schedule on the last stage."""
    import eval.ar_slice as ar

    original = ar.load_bigram_counts
    ar.load_bigram_counts = lambda path, expected_vocab_size=None, expected_tokenizer=None, **k: original(path)
    return _hook_after_save(rank, raw, world)


def test_previous_step_for_the_plot_overlay_is_found_on_disk_after_a_restart(tmp_path):
    from eval.hook import ArSliceHook

    for step in (2, 4, 8):
        atomic_write_json(tmp_path / f"global_step{step}" / "ar_slice.json", {"iteration": step})
    step, doc = ArSliceHook._previous_on_disk(6, str(tmp_path / "global_step6"))
    assert step == 4 and doc == {"iteration": 4}
    assert ArSliceHook._previous_on_disk(2, str(tmp_path / "global_step2")) is None


def test_an_enabled_ar_eval_without_its_hook_is_refused(tiny_raw, bigram_file, tmp_path):
    """The library's loop runs only the hooks its entry point wires: an enabled ar_eval that nothing would
    evaluate is refused before training, naming the fix, never silently skipped."""
    from neox_zoology.config import ConfigError
    from neox_zoology.training.loop import check_hooks

    args = build_args(hook_raw(tiny_raw, bigram_file, tmp_path), world_size=1)
    with pytest.raises(ConfigError, match="ar_eval.enabled is true but this entry point runs no AR-slice hook"):
        check_hooks(args, ())
    from eval.hook import ArSliceHook

    check_hooks(args, (ArSliceHook,))  # wired: accepted
    args.ar_eval = {**args.ar_eval, "enabled": False}
    check_hooks(args, ())  # disabled: nothing to run

"""Faults during training: a rank killed mid-save, preemption signals, non-finite gradients."""
import json
import os
import signal

import pytest
import yaml

from dist import run_ranks
from neox_zoology.config import build_args
from test_training import losses, train


def _train_killed_in_save(rank, raw, world, kill_tag):
    """Train; when the save of `kill_tag` has written its files, every rank dies (SIGKILL) before the rename."""
    import torch

    import deepspeed.runtime.engine as ds_engine

    from neox_zoology.training.loop import run

    original = ds_engine.DeepSpeedEngine.save_checkpoint

    def save_then_die(self, save_dir, tag=None, **kw):
        out = original(self, save_dir, tag=tag, **kw)
        if tag == kill_tag + ".incomplete":
            torch.distributed.barrier()
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    ds_engine.DeepSpeedEngine.save_checkpoint = save_then_die
    return run(build_args(raw, world_size=world))


def test_kill_during_save_keeps_previous_checkpoint_and_resume_matches(tiny_raw, tmp_path):
    raw = tiny_raw(train_iters=6, checkpoint_factor=2, save=str(tmp_path / "ckpt"))
    straight = train({**raw, "save": str(tmp_path / "straight")}, 2)[0]
    with pytest.raises(AssertionError, match="died without a result"):
        run_ranks(_train_killed_in_save, 2, raw, 2, "global_step4")
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest").read_text() == "global_step2"
    assert (ckpt / "global_step4.incomplete").is_dir() and not (ckpt / "global_step4").exists()
    resumed = train({**raw, "load": str(ckpt)}, 2)[0]
    assert resumed["start_iteration"] == 2
    assert losses(resumed) == losses(straight)[2:]  # nothing from the interrupted save leaked in
    assert not (ckpt / "global_step4.incomplete").exists()
    assert (ckpt / "latest").read_text() == "global_step6"


def _cli_with_signal(rank, cfg_path, summary_path, signal_at, signal_rank):
    """Run the CLI; rank `signal_rank` receives SIGUSR1 during step `signal_at`."""
    from neox_zoology.training import cli, loop

    original, calls = loop.train_step, []

    def step_and_signal(*a, **kw):
        out = original(*a, **kw)
        calls.append(1)
        if len(calls) == signal_at and rank == signal_rank:
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    loop.train_step = step_and_signal
    return cli.main([str(cfg_path), "--summary-json", str(summary_path)])


def test_preemption_signal_saves_exits_75_and_resume_equals_uninterrupted_run(tiny_raw, tmp_path):
    raw = tiny_raw(train_iters=6, save=str(tmp_path / "ckpt"), load=str(tmp_path / "ckpt"))
    straight = train({**raw, "save": str(tmp_path / "straight"), "load": None}, 2)[0]
    cfg = tmp_path / "run.yml"
    cfg.write_text(yaml.safe_dump(raw))
    codes = run_ranks(_cli_with_signal, 2, cfg, tmp_path / "first.json", 3, 1)
    assert codes == [75, 75]  # every rank stops after the same step, with the preemption status
    first = json.loads((tmp_path / "first.json").read_text())
    assert first["preempted_at"] == 3 and (tmp_path / "ckpt" / "latest").read_text() == "global_step3"
    codes = run_ranks(_cli_with_signal, 2, cfg, tmp_path / "second.json", 99, 0)  # the same command again
    assert codes == [0, 0]
    second = json.loads((tmp_path / "second.json").read_text())
    assert second["start_iteration"] == 3
    assert losses(first) + losses(second) == losses(straight)  # one step lost: none


def _train_with_nan(rank, raw, world, nan_steps):
    """Train with the loss multiplied by NaN (so every gradient is NaN) at the given steps, on rank 0 only."""
    from neox_zoology.training import loop

    original, calls = loop.lm_loss, []

    def poisoned(output, labels):
        calls.append(1)
        loss = original(output, labels)
        return loss * float("nan") if rank == 0 and len(calls) in nan_steps else loss

    loop.lm_loss = poisoned
    try:
        return loop.run(build_args(raw, world_size=world))
    except loop.NonFiniteError as exc:
        return str(exc)


@pytest.mark.parametrize("zero", [0, 1], ids=["guarded-adamw", "zero1-overflow-check"])
def test_nonfinite_step_is_skipped_on_every_rank_and_training_goes_on(tiny_raw, zero):
    raw = tiny_raw(train_iters=6, zero_optimization={"stage": zero})
    for s in run_ranks(_train_with_nan, 2, raw, 2, {3}):
        assert s["skipped_steps"] == [3]
        assert [l != l for l in losses(s)] == [False, False, True, False, False, False]  # only step 3 is NaN


def test_too_many_nonfinite_steps_stop_the_run_with_a_clear_error(tiny_raw, tmp_path):
    raw = tiny_raw(train_iters=8, max_nonfinite_steps=2, checkpoint_factor=2, save=str(tmp_path / "c"))
    for msg in run_ranks(_train_with_nan, 2, raw, 2, {3, 4}):
        assert "2 consecutive steps (up to iteration 4) had non-finite gradients" in msg
        assert "global_step2" in msg
    assert (tmp_path / "c" / "latest").read_text() == "global_step2"


class _Payload:
    """Unpickling this runs code: what a weights_only load must refuse."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_files_are_loaded_weights_only(tiny_raw, tmp_path):
    import torch

    raw = tiny_raw(train_iters=2, save=str(tmp_path / "c"), zero_optimization={"stage": 0})
    train(raw, 1)
    states = tmp_path / "c" / "global_step2" / "mp_rank_00_model_states.pt"
    payload = torch.load(states, weights_only=True)  # what we wrote loads with weights_only
    payload["iteration_note"] = _Payload(tmp_path / "executed")
    torch.save(payload, states)
    with pytest.raises(AssertionError, match=r"mp_rank_00_model_states.pt is \d+ bytes, the manifest says"):
        train({**raw, "train_iters": 3, "load": str(tmp_path / "c")}, 1)  # the manifest catches the change first
    (tmp_path / "c" / "global_step2" / "manifest.json").unlink()  # as a checkpoint saved without one
    with pytest.raises(AssertionError, match=r"mp_rank_00_model_states.pt: refused to load: the file references io.open"):
        train({**raw, "train_iters": 3, "load": str(tmp_path / "c")}, 1)
    assert not (tmp_path / "executed").exists()


def test_resume_with_another_dp_size_is_exact_without_zero_and_refused_with_it(tiny_raw, tmp_path):
    from neox_zoology.config import ConfigError  # noqa: F401  (the error type the message comes from)

    raw = tiny_raw(train_iters=4, checkpoint_factor=2, zero_optimization={"stage": 0}, save=str(tmp_path / "z0"))
    straight = train({**raw, "save": str(tmp_path / "straight")}, 2)[0]
    dp2 = train({**raw, "train_iters": 2, "lr_decay_iters": 4}, 2)[0]
    # the same global batch on one rank: gradient accumulation 2 instead of DP 2
    dp1 = train({**raw, "gradient_accumulation_steps": 2, "load": str(tmp_path / "z0"), "save": None}, 1)[0]
    assert dp1["start_iteration"] == 2
    assert losses(dp2) + losses(dp1) == pytest.approx(losses(straight), abs=1e-5)

    zero1 = {**raw, "zero_optimization": {"stage": 1}, "train_iters": 2, "save": str(tmp_path / "z1")}
    train(zero1, 2)
    with pytest.raises(AssertionError, match=r"saved with tensor_parallel 1, pipe_parallel 1, data_parallel 2, "
                                             r"zero_stage 1; this run has .*data_parallel 1.*data_parallel differ"):
        train({**zero1, "gradient_accumulation_steps": 2, "load": str(tmp_path / "z1"), "train_iters": 4}, 1)


@pytest.mark.slow
def test_two_node_launch_equals_two_ranks_on_one_node(tiny_raw, tmp_path):
    """Two `deepspeed --no_ssh` launches (node ranks 0 and 1, one CPU rank each, master 127.0.0.1)."""
    import subprocess
    import sys

    from conftest import ROOT
    from dist import free_port

    raw = tiny_raw(train_iters=3)
    single = train(raw, 2)[0]
    cfg, hostfile = tmp_path / "tiny.yml", tmp_path / "hostfile"
    cfg.write_text(yaml.safe_dump(raw))
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    port = str(free_port())
    procs = [
        subprocess.Popen(
            ["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(r), "--master_addr",
             "127.0.0.1", "--master_port", port, "train.py", str(cfg), "--summary-json", str(tmp_path / f"s{r}.json")],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "TP 1 PP 1 DP 2" in outs[0]
    two_node = json.loads((tmp_path / "s0.json").read_text())  # written by global rank 0
    assert losses(two_node) == pytest.approx(losses(single), abs=1e-6)

"""bench.trainer_overhead: a short run in a forked 1-rank child (the pytest parent stays free of process groups)."""
from __future__ import annotations

import json

import pytest
from dist import run_ranks

from bench import trainer_overhead


def _bench(rank, out):
    return trainer_overhead.main(["--steps", "2", "--rounds", "1", "--threads", "1", "--out", out])


def test_short_run_reports_times_and_matching_losses(tmp_path, capfd):
    out = tmp_path / "sub" / "bench.json"
    (result,) = run_ranks(_bench, 1, str(out), timeout=120)

    for key in ("ours_step_s", "bare_step_s", "ratio", "target_ratio", "target_met", "steps", "rounds", "threads",
                "loss_first_step_abs_diff", "machine", "ours", "bare", "model"):
        assert key in result, key
    assert result["ours_step_s"] > 0 and result["bare_step_s"] > 0
    assert result["ratio"] == pytest.approx(result["ours_step_s"] / result["bare_step_s"])
    assert result["target_ratio"] == 1.3
    assert result["target_met"] == (result["ratio"] <= 1.3)
    assert len(result["ours"]["step_s"]) == len(result["bare"]["step_s"]) == 2
    assert result["loss_first_step_abs_diff"] < 1e-5
    # the demo config, with its ZeRO stage, through the plain DeepSpeed engine
    assert result["ours"]["engine"] == "DeepSpeedEngine"
    assert result["ours"]["zero_stage"] == 1
    assert (result["model"]["num_layers"], result["model"]["hidden_size"], result["model"]["seq_length"],
            result["model"]["micro_batch"]) == (4, 128, 128, 8)
    for key in ("cpu", "cores", "torch", "deepspeed"):
        assert result["machine"][key]

    # stdout carries the JSON only (DeepSpeed's logging went to stderr), and --out holds the same
    printed = json.loads(capfd.readouterr().out)
    assert printed == json.loads(out.read_text()) == json.loads(json.dumps(result))


def test_bad_options_are_refused():
    with pytest.raises(SystemExit):
        trainer_overhead.parse(["--steps", "2", "--rounds", "3"])
    with pytest.raises(SystemExit):
        trainer_overhead.parse(["--steps", "0"])

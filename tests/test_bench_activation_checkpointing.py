"""bench.activation_checkpointing on a tiny config: plain, checkpointed and checkpointed + chunked-head rows,
the same first loss, memory ratios against the plain row, time ratios from the interleaved run."""
import statistics

from bench import activation_checkpointing as ac


def test_tiny_run_pairs_checkpointed_rows_with_plain(tmp_path):
    r = ac.main(["--config", "configs/neox/demo_cpu.yml", "--layers", "2", "--seq-len", "64", "--steps", "1",
                 "--threads", "1", "--lm-head-chunk-tokens", "24", "--rounds", "2", "--out", str(tmp_path / "ac.json")])
    plain, ckpt, chunked = r["results"]
    assert not plain["checkpoint_activations"] and ckpt["checkpoint_activations"] and chunked["checkpoint_activations"]
    assert (plain["lm_head_chunk_tokens"], ckpt["lm_head_chunk_tokens"], chunked["lm_head_chunk_tokens"]) == (0, 0, 24)
    assert ckpt["same_loss"] and ckpt["num_layers"] == 2
    assert chunked["same_loss"] and abs(chunked["first_loss_diff"]) < 1e-4
    assert "time_ratio" not in plain
    (timing,) = r["interleaved_timing"]
    assert timing["rounds"] == 2 and timing["orders"][1] == ["checkpointed", "checkpointed_chunked_head", "plain"]
    # the interleaved run's variants are the separate runs' models: the same first losses
    assert abs(timing["first_loss"]["plain"] - plain["first_loss"]) < 1e-5
    assert abs(timing["first_loss"]["checkpointed_chunked_head"] - chunked["first_loss"]) < 1e-5
    for row, name in ((ckpt, "checkpointed"), (chunked, "checkpointed_chunked_head")):
        ratios = [t / p for t, p in zip(timing["times_s"][name], timing["times_s"]["plain"])]
        assert row["time_ratio"] == timing["time_ratio"][name] == statistics.median(ratios)
        assert row["time_ratio_separate_runs"] == row["time_s"] / plain["time_s"]
        assert row["memory_ratio"] == row["activation_bytes"] / plain["activation_bytes"]
        assert row["memory_met"] == (row["memory_ratio"] <= 0.5) and row["time_met"] == (row["time_ratio"] <= 1.4)
    assert plain["activation_bytes"] > 0 and r["malloc"] == "MALLOC_MMAP_THRESHOLD_=65536"
    assert (tmp_path / "ac.json").exists()

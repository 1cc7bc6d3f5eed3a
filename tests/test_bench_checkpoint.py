"""bench.checkpoint on a tiny config, in a forked 1-rank child (the pytest parent stays free of process groups)."""
from dist import run_ranks


def _bench(rank, argv):
    from bench import checkpoint

    return checkpoint.main(argv)


def test_tiny_checkpoint_bench_reports_both_sides(tmp_path, capfd):
    out = tmp_path / "ckpt.json"
    (r,) = run_ranks(_bench, 1, ["--config", "configs/neox/demo_cpu.yml", "--set", "num_layers=2", "--set",
                                 "hidden_size=64", "--rounds", "2", "--dir", str(tmp_path / "w"), "--out", str(out)])
    assert r["parameters"] > 0 and r["checkpoint_bytes"] > 4 * r["parameters"]  # weights + Adam state
    assert abs(r["plain_file_bytes"] - r["checkpoint_bytes"]) < 0.5 * r["checkpoint_bytes"]
    for key in ("ours_save", "unverified_save", "plain_save", "ours_load", "plain_load"):
        assert len(r["times_s"][key]) == 2 and all(t > 0 for t in r["times_s"][key])
    assert r["save_ratio"] == r["save_s"] / r["plain_save_s"]
    assert r["manifest_cost"] == r["save_s"] / r["unverified_save_s"] - 1
    assert r["targets"][0]["value"] == r["manifest_cost"]
    assert (tmp_path / "w" / "ours" / "latest").read_text() == "global_step2"
    assert (tmp_path / "w" / "ours" / "global_step2" / "manifest.json").exists()  # the last save is a verified one
    assert out.exists()

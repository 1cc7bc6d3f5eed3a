"""bench.activation_checkpointing on a tiny config: both rows, same first loss, ratios against the plain row."""
from bench import activation_checkpointing as ac


def test_tiny_run_pairs_checkpointed_with_plain(tmp_path):
    r = ac.main(["--config", "configs/neox/demo_cpu.yml", "--layers", "2", "--seq-len", "64", "--steps", "1",
                 "--threads", "1", "--out", str(tmp_path / "ac.json")])
    plain, ckpt = r["results"]
    assert not plain["checkpoint_activations"] and ckpt["checkpoint_activations"]
    assert ckpt["same_loss"] and ckpt["num_layers"] == 2
    assert ckpt["time_ratio"] == ckpt["time_s"] / plain["time_s"]
    assert ckpt["memory_ratio"] == ckpt["activation_bytes"] / plain["activation_bytes"]
    assert (tmp_path / "ac.json").exists()

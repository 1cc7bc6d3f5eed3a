"""Nothing lost, nothing silently wrong: resume rules, checkpoint manifests, same-model checks, data and
tokenizer identity. Every fault is a row: how the world is broken, and the one line (and exit status) the
user gets. Preflight faults run `train.py`'s main in this process (they end before any process group);
faults a running job finds run it in a forked 1-rank child."""
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from dist import run_ranks
from test_training import losses


def base_raw(corpus, run_dir: Path, **overrides) -> dict:
    raw = {
        "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32,
        "attention_config": [[["baseconv", "attention"], "all"]], "norm": "rmsnorm", "activation": "swiglu",
        "intermediate_size": 96,  # GPT-NeoX's size for 32-wide gated projections (3 x 32)
        "pos_emb": "rotary", "optimizer": {"type": "Adam", "params": {"lr": 1.0e-2}}, "warmup": 0.2,
        "zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": 2, "train_iters": 4,
        "checkpoint_factor": 2, "seed": 7, "data_path": corpus["data_prefix"], "split": "90,10,0",
        "tokenizer_type": "SPMTokenizer", "vocab_file": corpus["tokenizer"],
        "data_cache_path": str(run_dir / "cache"), "eval_iters": 0, "log_interval": 1,
        "save": str(run_dir / "ckpt"), "load": str(run_dir / "ckpt"),
    }
    raw.update(overrides)
    return raw


def _cli(rank, argv):
    from neox_zoology.training import cli

    return cli.main(argv)


def write_config(path: Path, raw: dict) -> str:
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory):
    """A run folder with global_step2 and global_step4 (latest), and its summary."""
    run_dir = tmp_path_factory.mktemp("trained")
    raw = base_raw(tiny_corpus, run_dir)
    cfg = write_config(run_dir / "run.yml", raw)
    assert run_ranks(_cli, 1, [cfg, "--summary-json", str(run_dir / "summary.json")]) == [0]
    return run_dir


@pytest.fixture
def run(trained, tiny_corpus, tmp_path):
    """A fresh copy of the trained run folder and a function launching train.py on it."""
    shutil.copytree(trained / "ckpt", tmp_path / "ckpt")

    def launch(fork=True, args=(), **overrides):
        raw = base_raw(tiny_corpus, tmp_path, **overrides)
        argv = [write_config(tmp_path / "run.yml", raw), "--summary-json", str(tmp_path / "summary.json"), *args]
        if fork:
            return run_ranks(_cli, 1, argv)[0]
        from neox_zoology.training import cli

        return cli.main(argv)

    launch.dir = tmp_path
    launch.ckpt = tmp_path / "ckpt"
    launch.summary = lambda: json.loads((tmp_path / "summary.json").read_text())
    return launch


def flip(path: Path, offset: int = 4096, length: int = 4096) -> None:
    """Invert `length` bytes in the middle of a file (a silent disk or copy fault)."""
    data = bytearray(path.read_bytes())
    start = min(offset, max(0, len(data) - length))
    data[start:start + length] = bytes(b ^ 0xFF for b in data[start:start + length])
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- faults found before launch

def _no_folder(r):
    return {"load": str(r.dir / "typo"), "save": str(r.dir / "new")}


def _empty_folder(r):
    (r.dir / "empty").mkdir()
    return {"load": str(r.dir / "empty"), "save": str(r.dir / "new")}


def _latest_deleted(r):
    (r.ckpt / "latest").unlink()
    return {}


def _latest_empty(r):
    (r.ckpt / "latest").write_text("")
    return {}


def _latest_garbage(r):
    (r.ckpt / "latest").write_text("\x00\x17garbage")
    return {}


def _latest_missing_step(r):
    (r.ckpt / "latest").write_text("global_step9")
    return {}


def _topology_deleted(r):
    (r.ckpt / "global_step4" / "configs" / "topology.json").unlink()
    return {}


def _topology_truncated(r):
    p = r.ckpt / "global_step4" / "configs" / "topology.json"
    p.write_text(p.read_text()[:10])
    return {}


def _model_json_deleted(r):
    (r.ckpt / "global_step4" / "configs" / "model.json").unlink()
    return {}


def _config_deleted(r):
    (r.ckpt / "global_step4" / "configs" / "config.yml").unlink()
    return {}


def _fresh_run_into_used_folder(r):
    return {"load": None}


def _finetune_into_the_loaded_folder(r):
    return {"finetune": True}


PREFLIGHT = [
    ("load folder does not exist", _no_folder, "load: {dir}/typo does not exist; give the save folder"),
    ("load folder is empty", _empty_folder, "load: {dir}/empty holds no checkpoint (no latest, no global_step*)"),
    ("latest is missing", _latest_deleted, "has checkpoints (global_step2, global_step4) but no `latest` file"),
    ("latest is empty", _latest_empty, "latest is empty (complete checkpoints there: global_step2, global_step4)"),
    ("latest is garbage", _latest_garbage, "not a checkpoint (global_step<N>)"),
    ("latest names a missing step", _latest_missing_step, "latest names global_step9, which does not exist"),
    ("topology.json deleted", _topology_deleted, "global_step4/configs/topology.json is missing"),
    ("topology.json truncated", _topology_truncated, "global_step4/configs/topology.json is unreadable"),
    ("model.json deleted", _model_json_deleted, "global_step4/configs/model.json is missing"),
    ("config.yml deleted", _config_deleted, "latest names global_step4, which is incomplete (no configs/config.yml)"),
    ("fresh run into a folder of checkpoints", _fresh_run_into_used_folder,
     "save: {dir}/ckpt holds checkpoints of another run (global_step2, global_step4); this run did not load"),
    ("finetune writing over the loaded run", _finetune_into_the_loaded_folder,
     "finetune starts again at iteration 0 and would replace them"),
    ("more heads", lambda r: {"num_attention_heads": 8},
     "holds another model than this config builds: num_attention_heads: saved 4, this run 8"),
    ("attention -> sliding window", lambda r: {"attention_config": [[["baseconv", "sliding_window"], "all"]]},
     "layer types differ at layer 1: attention -> sliding_window"),
    ("rotary -> none", lambda r: {"pos_emb": "none"}, "pos_emb: saved rotary, this run none"),
    ("a mixer argument", lambda r: {"baseconv": {"kernel_sizes": [5, -1]}},
     "baseconv.kernel_sizes: saved [3, -1], this run [5, -1]"),
    ("a wider MLP", lambda r: {"intermediate_size": 192}, "ffn_hidden_size: saved 96, this run 192"),
    ("finetune into another shape", lambda r: {"finetune": True, "save": str(r.dir / "ft"), "hidden_size": 64},
     "holds other parameter shapes than this config builds (parameter"),
    ("GPT-2 tokenizer without merges", lambda r: {"tokenizer_type": "GPT2BPETokenizer"},
     "tokenizer_type 'GPT2BPETokenizer' needs merge_file"),
    ("HF tokenizer type given a SentencePiece model", lambda r: {"tokenizer_type": "HFTokenizer"},
     "tokenizer_type 'HFTokenizer' cannot read vocab_file"),
]


@pytest.mark.parametrize("what,breaks,message", PREFLIGHT, ids=[row[0] for row in PREFLIGHT])
def test_preflight_fault_is_one_line_and_exit_2(run, what, breaks, message, capsys):
    overrides = breaks(run)
    assert run(fork=False, **overrides) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("config error: "), err
    assert message.format(dir=run.dir) in err[0]
    assert (run.ckpt / "global_step4").is_dir()  # nothing was touched


@pytest.mark.parametrize("what,breaks,message", PREFLIGHT[:4] + PREFLIGHT[12:13],
                         ids=[row[0] for row in PREFLIGHT[:4] + PREFLIGHT[12:13]])
def test_dry_run_finds_the_same_faults(run, what, breaks, message, capsys):
    overrides = breaks(run)
    assert run(fork=False, args=["--dry-run"], **overrides) == 2
    assert message.format(dir=run.dir) in capsys.readouterr().err


# --------------------------------------------------------------------------- resume rules that run

def test_auto_resume_on_an_empty_folder_starts_fresh_and_says_so(run, capfd):
    assert run(load=str(run.dir / "new"), save=str(run.dir / "new"), train_iters=2) == 0
    out = capfd.readouterr().out
    assert "holds no checkpoint yet: starting at iteration 0 (load == save" in out
    assert run.summary()["start_iteration"] == 0 and (run.dir / "new" / "global_step2").is_dir()


def test_a_resume_past_train_iters_says_there_is_nothing_to_train(run, capfd):
    assert run(train_iters=3) == 0
    assert "is at iteration 4, train_iters is 3: nothing left to train" in capfd.readouterr().out
    assert run.summary()["losses"] == [] and (run.ckpt / "latest").read_text() == "global_step4"


def test_a_changed_seq_length_resumes_and_is_said(run, capfd):
    assert run(seq_length=16, train_iters=5) == 0
    assert "was trained at seq_length 32; this run uses 16" in capfd.readouterr().out
    assert run.summary()["start_iteration"] == 4


def test_finetune_keeps_the_weights_starts_at_zero_and_lists_the_changes(run, capfd):
    assert run(finetune=True, save=str(run.dir / "ft"), attention_config=[[["baseconv", "sliding_window"], "all"]],
               train_iters=2) == 0
    out = capfd.readouterr().out
    assert "finetune: the model differs from" in out and "attention -> sliding_window" in out
    s = run.summary()
    assert s["start_iteration"] == 0 and len(losses(s)) == 2
    assert "finetuning from" in out and (run.dir / "ft" / "global_step2" / "manifest.json").exists()


def test_overwrite_checkpoints_lets_a_new_run_write_there(run):
    assert run(load=None, overwrite_checkpoints=True, train_iters=2) == 0
    assert run.summary()["start_iteration"] == 0 and (run.ckpt / "latest").read_text() == "global_step2"


# --------------------------------------------------------------------------- verification on load

def _model_states(r):
    return r.ckpt / "global_step4" / "mp_rank_00_model_states.pt"


def _optim_states(r):
    return next((r.ckpt / "global_step4").glob("*optim_states.pt"))


CORRUPT = [
    ("4 KiB inverted in the model states", lambda r: flip(_model_states(r)),
     "mp_rank_00_model_states.pt does not match its checksum"),
    ("4 KiB inverted in the optimizer states", lambda r: flip(_optim_states(r)), "optim_states.pt does not match its checksum"),
    ("truncated model states", lambda r: _model_states(r).write_bytes(_model_states(r).read_bytes()[:1000]),
     "mp_rank_00_model_states.pt is 1000 bytes, the manifest says"),
    ("a file deleted", lambda r: _optim_states(r).unlink(), "optim_states.pt is missing"),
    ("manifest garbage", lambda r: (r.ckpt / "global_step4" / "manifest.json").write_text("{"),
     "manifest.json is unreadable"),
]


@pytest.mark.parametrize("what,breaks,message", CORRUPT, ids=[row[0] for row in CORRUPT])
def test_a_corrupt_checkpoint_is_refused_naming_the_file(run, what, breaks, message, capfd):
    breaks(run)
    assert run(train_iters=6) == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("checkpoint error")]
    assert len(err) == 1 and message in err[0] and "failed verification" in err[0], err
    assert (run.ckpt / "latest").read_text() == "global_step4"


def test_load_fallback_loads_the_newest_checkpoint_that_verifies_and_says_so(run, trained, capfd):
    flip(_model_states(run))
    assert run(train_iters=6, lr_decay_iters=4, load_fallback=True, save=str(run.dir / "continued")) == 0
    out = capfd.readouterr().out
    assert "load_fallback:" in out and "LOADING THE OLDER" in out and "global_step2 INSTEAD" in out
    s = run.summary()
    assert s["start_iteration"] == 2
    straight = json.loads((trained / "summary.json").read_text())
    assert losses(s)[:2] == pytest.approx(losses(straight)[2:4], abs=1e-6)  # the same run from step 2


def test_save_writes_a_manifest_of_every_file(trained):
    from neox_zoology.training.checkpoint import file_digest

    ckpt = trained / "ckpt" / "global_step4"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    on_disk = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert sorted(manifest["files"]) == on_disk
    assert {"configs/config.yml", "configs/topology.json", "configs/model.json", "mp_rank_00_model_states.pt"} <= set(on_disk)
    for rel, entry in manifest["files"].items():
        assert list(file_digest(ckpt / rel)) == [entry["bytes"], entry["xxh3_128"]], rel


def _disk_full_at(rank, argv, tag):
    """The checkpoint engine's file writes for `tag` fail with ENOSPC."""
    import errno

    from neox_zoology.training import cli
    from neox_zoology.training.checkpoint import saving

    original = saving._HashingFile.write

    def write(self, data):
        if tag in getattr(self.f, "name", ""):
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, data)

    saving._HashingFile.write = write
    return cli.main(argv)


def test_disk_full_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(run, tiny_corpus, capfd):
    raw = base_raw(tiny_corpus, run.dir, train_iters=6)
    argv = [write_config(run.dir / "run.yml", raw)]
    assert run_ranks(_disk_full_at, 1, argv, "global_step6")[0] == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("checkpoint error")]
    assert len(err) == 1 and "saving checkpoint global_step6 failed:" in err[0] and "no space left" in err[0]
    assert "global_step4 (latest) is intact" in err[0]
    assert (run.ckpt / "latest").read_text() == "global_step4" and not (run.ckpt / "global_step6").exists()
    assert run(train_iters=6) == 0 and run.summary()["start_iteration"] == 4  # and the run goes on from there


def test_the_exit_3_message_names_the_last_verified_checkpoint():
    from neox_zoology.training.checkpoint import last_verified

    assert last_verified(None, "/r/global_step6", "/r/global_step4") == "/r/global_step6 (saved by this run, with its manifest)"
    assert last_verified(None, None, "/r/global_step4") == "/r/global_step4 (verified when this run loaded it)"
    assert last_verified(None, None, None).startswith("none")


# --------------------------------------------------------------------------- data and tokenizer identity

def test_data_made_with_another_tokenizer_is_refused(run, tiny_corpus, tmp_path_factory, capsys):
    from tokenization.train_spm import train_spm

    other = train_spm(Path(tiny_corpus["corpus"]), tmp_path_factory.mktemp("spm") / "other", 400)
    assert run(fork=False, load=None, save=str(run.dir / "new"), vocab_file=other) == 2
    err = capsys.readouterr().err
    assert f"{tiny_corpus['data_prefix']} was tokenized by SPMTokenizer:" in err
    assert "(vocabulary 512" in err and "this run's tokenizer is SPMTokenizer:" in err and "(vocabulary 400" in err


def test_a_rebuilt_dataset_never_reuses_the_old_sample_index(tiny_corpus, tmp_path):
    """The same prefix rebuilt with fewer documents, the same run folder and cache: the run trains on
    the new data (a stale index would point past its end)."""
    from tokenization.preprocess import preprocess

    prefix = tmp_path / "data" / "set"
    lines = Path(tiny_corpus["corpus"]).read_text().splitlines()
    src = tmp_path / "a.jsonl"
    src.write_text("\n".join(lines) + "\n")
    data_prefix = preprocess([src], prefix, "SPMTokenizer", tiny_corpus["tokenizer"], progress=False,
                             workers=1)["datasets"]["text"]
    raw = base_raw(tiny_corpus, tmp_path, data_path=data_prefix, save=None, load=None, train_iters=3, split="100,0,0")
    first = run_ranks(_cli, 1, [write_config(tmp_path / "r.yml", raw), "--summary-json", str(tmp_path / "1.json")])
    assert first == [0]
    src.write_text("\n".join(lines[: len(lines) // 4]) + "\n")  # far fewer documents, same prefix
    preprocess([src], prefix, "SPMTokenizer", tiny_corpus["tokenizer"], progress=False, workers=1)
    second = run_ranks(_cli, 1, [write_config(tmp_path / "r.yml", raw), "--summary-json", str(tmp_path / "2.json")])
    assert second == [0]
    caches = sorted(p.name for p in (tmp_path / "cache").rglob("*-GPTDataset-train-document_index.npy"))
    assert len(caches) == 2  # one sample index per build of the data: the second did not reuse the first
    a, b = (json.loads((tmp_path / f"{i}.json").read_text()) for i in (1, 2))
    assert losses(a) != losses(b)


def test_bigrams_out_a_folder_is_one_line(tiny_corpus, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.run([sys.executable, "-m", "tokenization.bigrams", "--train-prefix", tiny_corpus["data_prefix"],
                           "--split", "90,10,0", "--out", str(tmp_path), "--no-progress"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"bigrams: error: --out {tmp_path} is a folder; give the counts file to write, " \
                                  f"e.g. {tmp_path / 'bigrams.npz'}"


# --------------------------------------------------------------------------- the AR-slice CLI

def _ar_cli(rank, argv):
    from eval.standalone import main

    return main(argv)


def test_the_ar_slice_cli_refuses_a_checkpoint_of_another_model(trained, tiny_corpus, tmp_path, capfd):
    raw = base_raw(tiny_corpus, tmp_path, num_attention_heads=8)
    argv = [write_config(tmp_path / "r.yml", raw), "--load", str(trained / "ckpt"), "--out", str(tmp_path / "o.json"),
            "--bigram-counts", str(tmp_path / "unused.npz")]
    (tmp_path / "unused.npz").write_bytes(b"")
    assert run_ranks(_ar_cli, 1, argv) == [2]
    err = capfd.readouterr().err
    assert "holds another model than this config builds: num_attention_heads: saved 4, this run 8" in err


def test_weights_only_load_leaves_the_process_wide_allowances_as_they_were(tmp_path):
    """Loading a file with numpy RNG state allows numpy's classes for that call only, and keeps what was
    allowed process-wide before (megatron-core allows numpy's on import; taking that away broke later loads)."""
    import numpy as np

    from neox_zoology.training.checkpoint.loading import load_weights_only

    path = tmp_path / "state.pt"
    torch.save({"rng": np.random.get_state(), "w": torch.ones(2)}, path)
    before = list(torch.serialization.get_safe_globals())
    out = load_weights_only(path)
    assert set(torch.serialization.get_safe_globals()) == set(before)  # torch keeps them in a set: order varies
    assert out["rng"][0] == "MT19937" and torch.equal(out["w"], torch.ones(2))
    torch.serialization.clear_safe_globals()  # nothing allowed process-wide: the call still loads the file
    try:
        assert load_weights_only(path)["rng"][1].shape == (624,)
        assert torch.serialization.get_safe_globals() == []
    finally:
        torch.serialization.add_safe_globals(before)

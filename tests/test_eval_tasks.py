"""`eval_tasks`: lm-eval tasks run on every saved checkpoint during training (eval.lm_tasks, wired by train.py).
A tiny two-rank run with local tasks (tests/data/lm_eval) and one broken task: rank 0 writes
<checkpoint>/eval_tasks.json with the scores `python -m neox_zoology.harness` gives on that checkpoint,
tensorboard gets them, the broken task is one logged line and training runs to its end."""
import json
import os
import shutil

import pytest

from conftest import ROOT
from dist import run_ranks
from neox_zoology.config import ConfigError, build_args

pytest.importorskip("lm_eval", reason="lm-eval is part of the `eval` extra that make test installs")

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local task files only: no hub look-ups
TASKS = ROOT / "tests" / "data" / "lm_eval"
BASE = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 64,
        "train_micro_batch_size_per_gpu": 2}


def _train(rank, raw):
    os.chdir(ROOT)  # the task YAMLs name their data files relative to the repository
    from eval.lm_tasks import LmTasksHook
    from neox_zoology.training.loop import run

    calls = []

    class Recorded(LmTasksHook):
        def __call__(self, iteration, checkpoint_dir=None):
            doc = super().__call__(iteration, checkpoint_dir)
            calls.append((iteration, doc is not None))
            return doc

    summary = run(build_args(raw, world_size=2), after_save=(Recorded,))
    return summary, calls


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_tasks")
    broken = root / "broken_tasks"
    broken.mkdir()
    text = (TASKS / "zoo_tiny_ll.yaml").read_text().replace("task: zoo_tiny_ll", "task: zoo_broken")
    (broken / "zoo_broken.yaml").write_text(text.replace("tests/data/lm_eval/tiny_ll.jsonl", str(root / "nowhere.jsonl")))
    raw = {**BASE, "attention_config": [[["gated_deltanet", "attention"], "all"]], "norm": "rmsnorm",
           "activation": "gelu", "intermediate_size": 128, "pos_emb": "rotary",
           "optimizer": {"type": "Adam", "params": {"lr": 1.0e-2}}, "train_iters": 6, "checkpoint_factor": 3,
           "seed": 7, "data_path": tiny_corpus["data_prefix"], "split": "90,10,0", "tokenizer_type": "SPMTokenizer",
           "vocab_file": tiny_corpus["tokenizer"], "data_cache_path": str(root / "cache"), "eval_iters": 0,
           "save": str(root / "ckpt"), "tensorboard_dir": str(root / "tb"),
           "eval_tasks": ["zoo_tiny_ll", "zoo_broken", "zoo_tiny_rolling"],
           "eval_tasks_include_path": [str(TASKS), str(broken)]}
    results = run_ranks(_train, 2, raw, timeout=480.0)
    return root, raw, results


def test_each_checkpoint_gets_the_harness_scores_and_a_broken_task_does_not_stop_training(trained, tmp_path,
                                                                                          monkeypatch, tiny_corpus):
    from neox_zoology import harness

    root, raw, results = trained
    (summary, calls0), (_, calls1) = results
    assert summary["losses"][-1][0] == 6  # trained to the end despite the broken task
    assert calls0 == [(3, True), (6, True)] and calls1 == [(3, False), (6, False)]  # rank 0 evaluates and writes
    for step in (3, 6):
        doc = json.loads((root / "ckpt" / f"global_step{step}" / "eval_tasks.json").read_text())
        assert doc["iteration"] == step and set(doc["results"]) == {"zoo_tiny_ll", "zoo_tiny_rolling"}
        assert list(doc["failed"]) == ["zoo_broken"] and "\n" not in doc["failed"]["zoo_broken"]

    # the harness CLI on the last checkpoint gives the same scores
    monkeypatch.chdir(ROOT)
    cfg = tmp_path / "tok.yml"
    cfg.write_text(f"tokenizer_type: SPMTokenizer\nvocab_file: {tiny_corpus['tokenizer']}\n")
    out = tmp_path / "cli.json"
    assert harness.main([str(cfg), "--load", str(root / "ckpt" / "global_step6"), "--tasks",
                         "zoo_tiny_ll,zoo_tiny_rolling", "--include-path", str(TASKS), "--output", str(out)]) == 0
    cli = json.loads(out.read_text())["results"]
    ours = json.loads((root / "ckpt" / "global_step6" / "eval_tasks.json").read_text())["results"]
    for task in ("zoo_tiny_ll", "zoo_tiny_rolling"):
        numbers = {k: v for k, v in cli[task].items() if isinstance(v, float)}
        assert numbers and {k: ours[task][k] for k in numbers} == pytest.approx(numbers, rel=1e-6)
    # and step 3's weights are not step 6's: the scores moved
    early = json.loads((root / "ckpt" / "global_step3" / "eval_tasks.json").read_text())["results"]
    assert early["zoo_tiny_ll"]["perplexity,none"] != ours["zoo_tiny_ll"]["perplexity,none"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(root / "tb"))
    tb.Reload()
    events = tb.Scalars("eval_tasks/zoo_tiny_ll/perplexity")
    assert [e.step for e in events] == [3, 6]
    assert events[-1].value == pytest.approx(ours["zoo_tiny_ll"]["perplexity,none"], rel=1e-6)


def test_eval_tasks_keys_are_checked(monkeypatch):
    import importlib.util

    args = build_args({**BASE, "eval_tasks": ["piqa", "lambada_openai"], "eval_tasks_limit": 0.5}, world_size=1)
    assert args.eval_tasks == ["piqa", "lambada_openai"] and "eval_tasks" not in args.ignored_keys
    assert args.eval_tasks_limit == 0.5 and build_args({**BASE, "eval_tasks": ["piqa"]}, world_size=1).eval_tasks_limit == 10
    assert build_args({**BASE, "eval_tasks": ["piqa"], "eval_tasks_limit": None}, world_size=1).eval_tasks_limit is None
    for bad, words in ((["piqa,lambada"], "one lm-eval task name per list entry"), ("piqa", "use a list"),
                       ([3], "use a string")):
        with pytest.raises(ConfigError, match=words):
            build_args({**BASE, "eval_tasks": bad}, world_size=1)
    with pytest.raises(ConfigError, match="eval_tasks_limit"):
        build_args({**BASE, "eval_tasks": ["piqa"], "eval_tasks_limit": 0}, world_size=1)

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install '\.\[eval\]'"):
        build_args({**BASE, "eval_tasks": ["piqa"]}, world_size=1)
    assert build_args(dict(BASE), world_size=1).eval_tasks is None  # unset: lm-eval not needed


def test_a_trainer_without_the_hook_refuses_eval_tasks():
    from neox_zoology.training.loop import check_hooks

    args = build_args({**BASE, "eval_tasks": ["piqa"]}, world_size=1)
    with pytest.raises(ConfigError, match="LmTasksHook"):
        check_hooks(args, ())

    class Wired:
        config_key = "eval_tasks"

    check_hooks(args, (Wired,))


def test_a_failing_load_is_one_line_and_no_file(tmp_path, capsys):
    from eval.lm_tasks import RESULTS, LmTasksHook

    args = build_args({**BASE, "eval_tasks": ["zoo_tiny_ll"], "eval_tasks_include_path": [str(TASKS)]}, world_size=1)
    folder = tmp_path / "global_step1"
    folder.mkdir()
    assert LmTasksHook(args)(1, str(folder)) is None
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1 and "eval_tasks at iteration 1: failed" in lines[0] and "training continues" in lines[0]
    assert not (folder / RESULTS).exists()
    shutil.rmtree(folder)

import os
import sys
from pathlib import Path

# Forked multi-process tests deadlock if the parent already ran multi-threaded OpenMP work.
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402

SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A small real-text .bin/.idx + SentencePiece model (vocab 512), built once per session."""
    from tokenization.demo_corpus import build_demo_corpus

    return build_demo_corpus(tmp_path_factory.mktemp("corpus"), max_mb=0.3, vocab_size=512)


@pytest.fixture
def tiny_raw(tiny_corpus, tmp_path):
    """Raw config keys of a tiny BaseConv/attention hybrid that trains in well under a second per step."""

    def make(**overrides):
        raw = {
            "num_layers": 4,
            "hidden_size": 32,
            "num_attention_heads": 4,
            "seq_length": 32,
            "attention_config": [[["baseconv", "attention"], "all"]],
            "norm": "rmsnorm",
            "activation": "swiglu",
            "intermediate_size": 384,  # GPT-NeoX's size for 128-wide gated projections (3 x 128)
            "pos_emb": "rotary",
            "optimizer": {"type": "Adam", "params": {"lr": 1.0e-2, "betas": [0.9, 0.95]}},
            "weight_decay": 0.1,
            "warmup": 0.2,
            "gradient_clipping": 1.0,
            "zero_optimization": {"stage": 1},
            "train_micro_batch_size_per_gpu": 2,
            "train_iters": 5,
            "seed": 7,
            "data_path": tiny_corpus["data_prefix"],
            "split": "90,10,0",
            "tokenizer_type": "SPMTokenizer",
            "vocab_file": tiny_corpus["tokenizer"],
            "data_cache_path": str(tmp_path / "cache"),
            "eval_iters": 0,
            "log_interval": 1,
        }
        raw.update(overrides)
        return raw

    return make

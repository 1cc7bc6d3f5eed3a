"""Tokenizers selected by GPT-NeoX's ``tokenizer_type``.

Every tokenizer offers the same small surface: ``name``, ``vocab_size``, ``eod``, ``pad``,
``encode``, ``decode``, ``encode_batch`` and ``unique_identifiers``. That is what the preprocessing
scripts need and what megatron-core's ``GPTDataset`` reads from ``config.tokenizer`` (it hashes
``unique_identifiers`` into its index-cache names, so two tokenizers never share a cache).

The heavy lifting is done by the Hugging Face ``tokenizers`` library (byte-level BPE and tokenizer
JSON files) and by ``sentencepiece``; the classes here only load files and pick special ids.
A tokenizer's identity (type, vocabulary size, eod, sha256 of its files) is what datasets, bigram
counts and checkpoints record, so that data of one tokenizer is never read with another.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path


class Tokenizer:
    """Common interface; subclasses set the attributes and implement the three codec methods."""

    name: str
    vocab_size: int  # number of ids the tokenizer can emit (max id + 1)
    eod: int  # appended after every document
    pad: int  # eod when the tokenizer has no padding token
    unique_identifiers: OrderedDict

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def __repr__(self) -> str:
        return f"{self.name}(vocab_size={self.vocab_size}, eod={self.eod}, pad={self.pad})"


def _identifiers(cls: type, **paths: str) -> OrderedDict:
    # Absolute paths, so the same file named two ways gives the same dataset-cache hash.
    ids = OrderedDict([("class", cls.__name__)])
    ids.update((key, str(Path(path).resolve())) for key, path in paths.items())
    return ids


class _HFTokenizer(Tokenizer):
    """Shared code for tokenizers backed by a ``tokenizers.Tokenizer`` object."""

    def __init__(self, backend, **paths: str) -> None:
        self._tok = backend
        self.name = type(self).__name__
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.unique_identifiers = _identifiers(type(self), **paths)

    def _special_id(self, token: str, path: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{self.name}: {path} has no {token} token; use a vocabulary with one")
        return token_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # The Rust side encodes a batch on all cores.
        return [enc.ids for enc in self._tok.encode_batch(list(texts))]

    def decode(self, ids: list[int]) -> str:
        # Keep special tokens so document boundaries stay visible when inspecting data.
        return self._tok.decode(list(ids), skip_special_tokens=False)


class GPT2BPETokenizer(_HFTokenizer):
    """GPT-2 byte-level BPE from ``gpt2-vocab.json`` + ``gpt2-merges.txt``.

    No special tokens are registered, as in GPT-NeoX and OpenAI's encoder: a literal
    ``<|endoftext|>`` in the text is ordinary text and cannot forge a document boundary.
    """

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers

        backend = Backend(models.BPE.from_file(str(vocab_file), str(merge_file)))
        # GPT-2 splits on its regex and never prepends a space to the first word.
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        super().__init__(backend, vocab_file=vocab_file, merge_file=merge_file)
        self.eod = self._special_id("<|endoftext|>", vocab_file)
        self.pad = self.eod


class HFTokenizer(_HFTokenizer):
    """Any Hugging Face tokenizers JSON file, e.g. GPT-NeoX-20B's ``20B_tokenizer.json``."""

    def __init__(self, vocab_file: str) -> None:
        from tokenizers import Tokenizer as Backend

        super().__init__(Backend.from_file(str(vocab_file)), vocab_file=vocab_file)
        self.eod = self._special_id("<|endoftext|>", vocab_file)
        pad = self._tok.token_to_id("<|padding|>")
        self.pad = self.eod if pad is None else pad


class SPMTokenizer(Tokenizer):
    """A SentencePiece model; eod is its ``<|endoftext|>`` piece, else its eos id."""

    def __init__(self, vocab_file: str) -> None:
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(vocab_file))
        self.name = type(self).__name__
        self.vocab_size = self._sp.get_piece_size()
        self.unique_identifiers = _identifiers(type(self), vocab_file=vocab_file)

        # piece_to_id answers unk for an unknown piece, so check the round trip.
        eod = self._sp.piece_to_id("<|endoftext|>")
        if self._sp.id_to_piece(eod) != "<|endoftext|>":
            eod = self._sp.eos_id()
        if eod < 0:
            raise ValueError(
                f"SPMTokenizer: {vocab_file} has neither an <|endoftext|> piece nor an eos id; "
                "train it with tokenization.train_spm"
            )
        self.eod = eod
        self.pad = self._sp.pad_id() if self._sp.pad_id() >= 0 else eod

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # A list input is encoded by sentencepiece's C++ thread pool.
        return self._sp.encode(list(texts))

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(list(ids))


# tokenizer_type -> (class, names of the files it needs)
TOKENIZER_TYPES = {
    "GPT2BPETokenizer": (GPT2BPETokenizer, ("vocab_file", "merge_file")),
    "HFTokenizer": (HFTokenizer, ("vocab_file",)),
    "SPMTokenizer": (SPMTokenizer, ("vocab_file",)),
}


def build_tokenizer(
    tokenizer_type: str, vocab_file: str | None = None, merge_file: str | None = None
) -> Tokenizer:
    """Load the tokenizer that GPT-NeoX's ``tokenizer_type`` names from its file(s)."""
    if tokenizer_type not in TOKENIZER_TYPES:
        near = difflib.get_close_matches(str(tokenizer_type), TOKENIZER_TYPES, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise ValueError(
            f"unknown tokenizer_type {tokenizer_type!r}: {hint}"
            f"valid types are {', '.join(TOKENIZER_TYPES)}"
        )
    cls, needed = TOKENIZER_TYPES[tokenizer_type]
    given = {"vocab_file": vocab_file, "merge_file": merge_file}
    files = {key: given[key] for key in needed}
    for key, path in files.items():
        if path is None:
            raise ValueError(f"tokenizer_type {tokenizer_type!r} needs {key}: set it to its path")
        if not Path(path).is_file():
            raise ValueError(
                f"{key} {str(path)!r} for tokenizer_type {tokenizer_type!r} does not exist: "
                "fix the path"
            )
    try:
        return cls(**files)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - the backends raise bare Exceptions on a file of another kind
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        shown = ", ".join(f"{key} {path}" for key, path in files.items())
        raise ValueError(
            f"tokenizer_type {tokenizer_type!r} cannot read {shown} ({first}); check that the file is what "
            f"this tokenizer_type reads (GPT2BPETokenizer: gpt2-vocab.json + gpt2-merges.txt, HFTokenizer: a "
            f"tokenizer .json, SPMTokenizer: a SentencePiece .model)"
        ) from None


# ---------------------------------------------------------------------------------------- identity

def _sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_identity(tokenizer: Tokenizer) -> dict:
    """Type, vocab size, eod and sha256 of each file of a tokenizer: equal identities encode alike."""
    ids = dict(tokenizer.unique_identifiers)
    return {
        "type": ids.pop("class", type(tokenizer).__name__),
        "vocab_size": int(tokenizer.vocab_size),
        "eod": int(tokenizer.eod),
        "files": {key: "sha256:" + _sha256(path) for key, path in sorted(ids.items())},
    }


def as_identity(tokenizer) -> dict:
    """The identity dict of a Tokenizer (its files are hashed); an identity dict as it is."""
    return tokenizer if isinstance(tokenizer, dict) else tokenizer_identity(tokenizer)


def identity_id(identity: dict) -> str:
    """A short name for a tokenizer identity: type and 16 hex digits of a hash of its files."""
    blob = json.dumps({"type": identity["type"], "files": identity["files"]}, sort_keys=True)
    return f"{identity['type']}:{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def same_tokenizer(a: dict, b: dict) -> bool:
    return (a["type"], a["files"], a.get("vocab_size")) == (b["type"], b["files"], b.get("vocab_size"))


def dataset_tokenizer(prefix: str) -> dict | None:
    """The tokenizer identity recorded in ``prefix.json`` (tokenization.preprocess writes it), if any;
    ValueError naming the file when the record is unreadable."""
    path = Path(prefix + ".json")
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["tokenizer"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: unreadable dataset record ({exc}); make the dataset again "
                         "with python -m tokenization.preprocess") from None


# ------------------------------------------------------------------------------------ for a run

def load_tokenizer(args):
    """The run's tokenizer; a file that is missing or of another kind is a ConfigError naming it."""
    from neox_zoology.config import ConfigError

    try:
        return build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file)
    except ValueError as exc:
        where = args.sources.get("vocab_file") or args.sources.get("tokenizer_type") or "config"
        raise ConfigError(f"{where}: {exc}") from None


def resolve_vocab(args, tokenizer=None) -> None:
    """Set padded_vocab_size from the tokenizer (or the `vocab_size` key when no tokenizer is loaded)."""
    from neox_zoology.config import ConfigError, pad_vocab

    if tokenizer is not None:
        if args.vocab_size is not None and args.vocab_size != tokenizer.vocab_size:
            raise ConfigError(
                f"{args.sources.get('vocab_size', 'config')}: vocab_size {args.vocab_size} differs from the "
                f"tokenizer's {tokenizer.vocab_size} ({args.vocab_file}); remove vocab_size or fix it"
            )
        args.vocab_size = tokenizer.vocab_size
    if args.vocab_size is None:
        raise ConfigError(
            f"vocab_size is unknown: the tokenizer file {args.vocab_file!r} is missing; set vocab_file "
            f"(and merge_file) to existing files or set vocab_size"
        )
    args.padded_vocab_size = pad_vocab(args.vocab_size, args.make_vocab_size_divisible_by, args.tp)

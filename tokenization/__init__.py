"""Tokenizers (GPT2BPETokenizer, HFTokenizer, SPMTokenizer), SentencePiece training and the demo
corpus builder. ``build_tokenizer`` is the one entry point the training stack needs."""

from tokenization.tokenizer import Tokenizer, build_tokenizer

__all__ = ["Tokenizer", "build_tokenizer"]

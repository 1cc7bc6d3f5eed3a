"""Preprocessing JSONL to megatron-core .bin/.idx, SentencePiece training, bigram training counts and
the demo corpus builder. The tokenizers themselves are part of the library: neox_zoology.tokenizer."""

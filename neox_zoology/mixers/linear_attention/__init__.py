"""Linear-attention mixers that followed Zoology: Based, GLA, gated DeltaNet (one registration per file).

Shared: the chunked and recurrent kernels (kernels.py), short convolutions and the per-head output
norm (common.py). Derivations and the differences from the references: docs/recall-mixers.md.
"""
from neox_zoology.mixers.linear_attention import based, gated_deltanet, gla  # noqa: F401

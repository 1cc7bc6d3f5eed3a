"""Process groups and tensor-parallel building blocks.

megatron-core owns the process groups (`parallel_state`) and the TP layers; DeepSpeed owns the
launcher, engine and pipeline. This package joins the two and supplies the few CPU shims the
stack needs on a machine without CUDA.
"""
from neox_zoology.parallel.tp import (  # noqa: F401
    ColumnLinear,
    VocabEmbedding,
    RowLinear,
    copy_to_tp,
    gather_from_tp,
    mark_tp_param,
    reduce_from_tp,
    tp_rank,
    tp_size,
    tp_slice,
)

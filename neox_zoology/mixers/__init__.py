"""Built-in mixers; importing this package registers them (one module per family)."""
from neox_zoology.mixers import attention, baseconv, h3, hyena, long_conv, rwkv  # noqa: F401
from neox_zoology.mixers import linear_attention, mamba, sparse  # noqa: F401

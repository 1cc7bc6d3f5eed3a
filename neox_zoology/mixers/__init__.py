"""Built-in mixers; importing this package registers them (one module per family)."""
from neox_zoology.mixers import attention, baseconv  # noqa: F401

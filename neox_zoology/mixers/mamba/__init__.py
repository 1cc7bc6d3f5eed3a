"""Mamba: the selective scan (scan.py) and the layer with its registration (layer.py)."""
from neox_zoology.mixers.mamba import layer  # noqa: F401

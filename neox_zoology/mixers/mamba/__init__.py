"""Mamba: the selective scan (scan.py) and the layer with its registration (layer.py); Mamba-2's SSD (mamba2.py)."""
from neox_zoology.mixers.mamba import layer, mamba2  # noqa: F401

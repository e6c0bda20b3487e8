"""corral: provision clusters from bare metal."""

__version__ = "0.1.0"

"""edgeos: a firmware-style runtime for industrial gateways, and its thin cloud receiver."""

__version__ = "0.1.0"
__all__ = ["__version__"]

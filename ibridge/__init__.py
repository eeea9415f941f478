"""ibridge: SFT and DPO through the implicit reward (arXiv 2507.00018)."""
__version__ = "0.1.0"

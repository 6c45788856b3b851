"""DSSN: Dual-level Siamese Structure Network for semi-supervised segmentation, on Ray."""

__version__ = "0.1.0"

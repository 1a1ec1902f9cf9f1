"""Sparse replacements for Gemma 3 MLPs: per-layer, skip and cross-layer transcoders.

Stands on `gemma_lm` (the model and its weight store); `circuits` stands on this package.
"""

from .model import ACTIVATIONS, KINDS, TranscoderConfig, TranscoderSet

__all__ = ["TranscoderConfig", "TranscoderSet", "KINDS", "ACTIVATIONS"]

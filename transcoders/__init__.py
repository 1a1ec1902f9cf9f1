"""Sparse replacements for Gemma 3 MLPs: per-layer, skip and cross-layer transcoders."""

from .model import ACTIVATIONS, KINDS, TranscoderConfig, TranscoderSet, random_transcoders

__all__ = ["TranscoderConfig", "TranscoderSet", "random_transcoders", "KINDS", "ACTIVATIONS"]

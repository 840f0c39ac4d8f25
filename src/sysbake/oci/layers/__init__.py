"""Layers as tar archives: writing, validating, extracting, flattening, commits."""

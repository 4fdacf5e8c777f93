"""Conversion: discover every batch norm (FX), probe the scales, rewrite into S-BN layers."""

"""Helpers every stage uses and none owns: atomic file writes, progress bars, install hints."""

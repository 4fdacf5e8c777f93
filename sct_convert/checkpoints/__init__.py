"""Checkpoint files: the safetensors format and its metadata, weights loading, the model zoo."""

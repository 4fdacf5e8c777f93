"""Deployment files: switchable and per-scale ONNX, torch.export programs, detector files."""

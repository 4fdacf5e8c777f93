"""Serving from eager PyTorch: cascades that answer each row at its smallest confident scale."""

"""``sct.evaluate``: what calibration or SCT buys at each scale, and its report."""

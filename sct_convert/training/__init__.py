"""Training a converted model: the Eq. 1 loss, the train step, dense targets, calibration, diagnostics."""

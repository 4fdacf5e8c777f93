"""torchvision detectors split into pre-processing, a routed core, and post-processing."""

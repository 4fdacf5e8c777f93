import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import settings

# CI runs the same examples every time (a red run is reproducible); HYPOTHESIS_PROFILE=explore
# draws new ones, to look for more failures before they reach CI.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False, max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# One thread per pytest-xdist worker (the suite runs one worker per core), else up to two.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="timm")
        yield


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A labelled image folder: 3 classes x 12 images of different sizes (a real loader resizes
    them), a colour cue per class so that scores are not all chance."""
    from PIL import Image

    root = tmp_path_factory.mktemp("val")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"class_{c}").mkdir()
        for i in range(12):
            side = int(rng.integers(40, 90))
            image = rng.integers(0, 255, (side, side + 7, 3), dtype=np.uint8)
            image[..., c] = 255
            Image.fromarray(image).save(root / f"class_{c}" / f"{i}.png")
    return root

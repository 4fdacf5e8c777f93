"""Run timm's own train.py (tests/data/timm_train.py, verbatim) with SCT: the two lines that
docs/training.md asks for (convert after create_model, SCTLoss around the train loss) applied
from outside, so the script itself is unchanged.

    python tests/run_timm_train.py --sct-scales 32,24 [train.py's own arguments ...]
"""
import runpy
import sys
from pathlib import Path

import timm.loss
import timm.models

import sct_convert as sct


def main() -> None:
    argv = sys.argv[1:]
    at = argv.index("--sct-scales")
    scales = [int(s) for s in argv[at + 1].split(",")]
    del argv[at:at + 2]
    create_model, smoothing_loss = timm.models.create_model, timm.loss.LabelSmoothingCrossEntropy
    timm.models.create_model = lambda *a, **k: sct.convert(create_model(*a, **k), scales=scales)
    timm.loss.LabelSmoothingCrossEntropy = lambda *a, **k: sct.SCTLoss(smoothing_loss(*a, **k))
    script = Path(__file__).with_name("data") / "timm_train.py"
    sys.argv = [str(script), *argv]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()

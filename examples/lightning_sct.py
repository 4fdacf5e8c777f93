"""SCT with PyTorch Lightning: convert in ``__init__``, ``SCTLoss`` in ``training_step``,
validation accuracy at every scale. Checkpoints hold every branch, so
``SCTClassifier.load_from_checkpoint`` restores the multi-scale model, and
``sct-convert ARCH --checkpoint last.ckpt --scales ... --out m.safetensors --per-scale out/``
turns a checkpoint into per-scale files.

    pip install lightning
    python examples/lightning_sct.py --quick          # random images, a few steps, CPU, 7 s
    python examples/lightning_sct.py --arch resnet18 --scales 224,192,128 --steps 1000 --precision bf16-mixed

The data here is random (torchvision's FakeData, nothing downloaded); put your own
DataLoader in ``main`` (examples/fashion_mnist.py reads Fashion-MNIST from Debian's package).
"""
from __future__ import annotations

import argparse
from typing import Sequence

import lightning as L
import timm
import torch

import sct_convert as sct


class SCTClassifier(L.LightningModule):
    """A timm classifier trained with Scale Calibrated Training."""

    def __init__(self, arch: str = "resnet18", num_classes: int = 10,
                 scales: Sequence[int] = (224, 192, 128), lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = sct.convert(timm.create_model(arch, num_classes=num_classes), list(scales))
        self.criterion = sct.SCTLoss(torch.nn.CrossEntropyLoss())

    def forward(self, x: torch.Tensor):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.criterion(self.model(x), y)  # train mode: one output per scale, Eq. 1
        for s, scale_loss in self.criterion.last_losses.items():
            self.log(f"train/loss_{s}", scale_loss)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        for s in sct.scales_of(self.model):
            hw = (s, s) if isinstance(s, int) else s
            logits = self.model(sct.resize_to(x, hw))  # eval mode: the branch of that size
            self.log(f"val/acc_{s}", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def fake_loader(size: int, n: int, num_classes: int, batch_size: int) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(size)
    data = torch.utils.data.TensorDataset(torch.randn(n, 3, size, size, generator=g),
                                          torch.randint(0, num_classes, (n,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=batch_size)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18", help="timm model name")
    p.add_argument("--scales", default="224,192,128", help="comma list of training scales")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed")
    p.add_argument("--quick", action="store_true", help="tiny model and sizes, 5 steps (a smoke run)")
    p.add_argument("--out", default="lightning_sct", help="directory for checkpoints")
    args = p.parse_args()
    if args.quick:
        args.arch, args.scales, args.steps, args.batch_size = "test_resnet", "64,48,32", 5, 4
    scales = [int(s) for s in args.scales.split(",")]
    module = SCTClassifier(args.arch, num_classes=10, scales=scales)
    trainer = L.Trainer(max_steps=args.steps, precision=args.precision, default_root_dir=args.out,
                        limit_val_batches=2, val_check_interval=min(args.steps, 50), log_every_n_steps=1)
    trainer.fit(module, fake_loader(max(scales), 8 * args.batch_size, 10, args.batch_size),
                fake_loader(max(scales), 2 * args.batch_size, 10, args.batch_size))
    path = f"{args.out}/last.ckpt"
    trainer.save_checkpoint(path)
    print(f"wrote {path}; per-scale files: sct-convert {args.arch} --checkpoint {path} "
          f"--scales {args.scales} --num-classes 10 --out {args.out}/model.safetensors --per-scale {args.out}/per_scale")


if __name__ == "__main__":
    main()

"""Helpers shared by the tests: comparisons, branch perturbation, a model with a train-only part."""
import torch

import sct_convert as sct


def tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in tensors(v)]
    return []


def assert_equivalent(a, b, rel=1e-5):
    """Same structure, same dtype, max abs diff <= rel x output magnitude."""
    ta, tb = tensors(a), tensors(b)
    assert len(ta) == len(tb) and ta, "outputs differ in structure"
    for x, y in zip(ta, tb):
        assert x.dtype == y.dtype and x.shape == y.shape
        scale = float(x.abs().max()) or 1.0
        assert float((x - y).abs().max()) <= rel * scale


def perturb_branches(model, strength=0.2, seed=0):
    """Give every branch its own statistics and affine parameters (as training would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in sct.scale_specific_layers(model):
            for branch in layer.branches.values():
                for name, t in list(branch.named_parameters()) + list(branch.named_buffers()):
                    if t.is_floating_point():
                        noise = torch.rand(t.shape, generator=g).to(t)
                        t.mul_(1 + strength * noise)
                        if "mean" in name or "bias" in name:
                            t.add_(strength * (noise - 0.5))


class TrainOnlyHead(torch.nn.Module):  # like inception_v3's aux head: only runs in train mode
    def __init__(self, needs_targets: bool = False):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.aux = torch.nn.Conv2d(4, 4, 9)
        self.drop = torch.nn.Dropout(0.5)
        self.needs_targets = needs_targets

    def forward(self, x):
        x = self.drop(self.bn(self.conv(x)))
        if self.training:
            if self.needs_targets:
                raise ValueError("targets should be passed in training mode")
            self.aux(x)
        return x.mean((2, 3))


class HeadOnlyBN(torch.nn.Module):  # its only BN sees pooled features: the same size at every scale
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.conv(x).mean((2, 3)))


class TinySegNet(torch.nn.Module):
    """A user's own encoder-decoder: torchvision's output convention ({"out", "aux"} at the input size)."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        block = lambda cin, cout, stride: torch.nn.Sequential(  # noqa: E731
            torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False), torch.nn.BatchNorm2d(cout), torch.nn.ReLU())
        self.encoder = torch.nn.Sequential(block(3, 8, 2), block(8, 16, 2), block(16, 16, 1))
        self.decoder = torch.nn.Sequential(block(16, 8, 1), torch.nn.Conv2d(8, num_classes, 1))
        self.aux = torch.nn.Conv2d(16, num_classes, 1)

    def forward(self, x):
        size = x.shape[-2:]
        features = self.encoder(x)
        up = lambda t: torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)  # noqa: E731
        return {"out": up(self.decoder(features)), "aux": up(self.aux(features))}


class ConvBN(torch.nn.Module):
    """The suite's smallest convertible CNN: ``depth`` (1 or 2) conv + norm blocks with a ReLU
    between them (and after the last with ``relu``), a mean over every position (frames too, for
    ``Conv3d``), then an optional dropout and linear head of ``classes`` outputs."""

    def __init__(self, conv=torch.nn.Conv2d, norm=torch.nn.BatchNorm2d, depth=1, classes=None, dropout=0.0,
                 relu=False):
        super().__init__()
        self.conv, self.bn = conv(3, 4, 3, padding=1), norm(4)
        if depth == 2:
            self.conv2, self.bn2 = conv(4, 4, 3, padding=1), norm(4)
        self.depth, self.relu = depth, relu
        self.drop = torch.nn.Dropout(dropout) if dropout else None
        self.fc = torch.nn.Linear(4, classes) if classes else None

    def forward(self, x):
        x = self.bn(self.conv(x))
        if self.depth == 2:
            x = self.bn2(self.conv2(torch.relu(x)))
        if self.relu:
            x = x.relu()
        x = x.flatten(2).mean(2)
        if self.drop is not None:
            x = self.drop(x)
        return self.fc(x) if self.fc is not None else x


def converted_test_resnet(scales, num_classes=5, seed=0):
    """timm's ``test_resnet`` converted at ``scales``, in eval, every branch given its own
    statistics (so a wrong branch would change the output), and the original it came from."""
    import copy

    import timm

    torch.manual_seed(seed)
    original = timm.create_model("test_resnet", num_classes=num_classes)
    model = sct.convert(copy.deepcopy(original), scales).eval()
    perturb_branches(model)
    return original, model


class Clip(torch.nn.Module):
    """A video model in miniature: a bias-free Conv3d (as torchvision's video models have) and a
    BatchNorm3d, over clips (N, C, T, H, W)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 4, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm3d(4)

    def forward(self, x):
        return self.bn(self.conv(x)).mean((2, 3, 4))


# torchvision detectors: a calibrated converted one, test images, and detections compared

SCALES_320_256 = [320, 256]


def detector(builder):
    """A converted random-init detector with per-scale statistics calibrated on a few images: a
    fresh one's features fade to nothing in eval mode and it scores every box alike, which would
    leave nothing to compare."""
    torch.manual_seed(0)
    model = sct.convert(builder(weights=None, weights_backbone=None, num_classes=3), SCALES_320_256).eval()
    sct.calibrate(model, [torch.stack([blobs((300, 400), seed) for seed in range(4)])], num_batches=1)
    return model.eval()


def blobs(hw, seed):
    """An image with structure at several sizes: what a detector finds boxes in (white noise
    gives a fresh one only degenerate, tied detections)."""
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 8, generator=g), size=hw, mode="bicubic")[0]
    return (0.8 * smooth + 0.2 * torch.rand(3, *hw, generator=g)).clamp(0, 1)


def same_detections(got, want, k=10):
    """Each of eager's ``k`` best detections whose score no other detection shares (within 2e-4:
    among equal scores, which box NMS keeps is up to the implementation) is in the file (same
    label, score within 2e-4, box within 2 pixels), and the other way round."""
    compared = 0
    for a, b in ((want, got), (got, want)):
        a = {n: torch.as_tensor(v) for n, v in a.items()}
        b = {n: torch.as_tensor(v) for n, v in b.items()}
        unambiguous = ((a["scores"][:, None] - a["scores"][None, :]).abs() < 2e-4).sum(1) == 1
        for i in a["scores"].argsort(descending=True)[:k]:
            if not unambiguous[i]:
                continue
            compared += 1
            close = ((b["labels"] == a["labels"][i]) & ((b["scores"] - a["scores"][i]).abs() < 2e-4)
                     & ((b["boxes"] - a["boxes"][i]).abs().amax(1) < 2.0))
            assert close.any(), f"detection {a['boxes'][i].tolist()} (score {float(a['scores'][i]):.4f}) missing"
    assert compared >= 4, "too few detections with a score of their own to compare"

"""Checkpoints: combined file round trip, strict per-scale exports, bad files, atomic writes."""
import os

import pytest
import safetensors.torch
import timm
import torch
import torchvision
from _util import assert_equivalent, perturb_branches, converted_test_resnet
from torch import nn

import sct_convert as sct
from sct_convert._utils import files
from sct_convert.checkpoints import files as io
from sct_convert.checkpoints import format as metadata

SCALES = [96, (64, 48)]


@pytest.fixture
def converted():
    return converted_test_resnet(SCALES)[1]


def _outputs(model, scales=SCALES):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 3, *((s, s) if isinstance(s, int) else s), generator=g) for s in scales]
    with torch.no_grad():
        return xs, [model.eval()(x) for x in xs]


def test_save_load_rebuilds_timm_arch_offline(converted, tmp_path):
    path = sct.save(converted, tmp_path / "m.safetensors")
    meta = metadata.read_metadata(path)
    assert meta["format"] == "sct-convert" and meta["arch"] == "test_resnet" and meta["source"] == "timm"
    assert meta["num_classes"] == "5" and meta["unknown_scale"] == "nearest"
    assert {"torch", "timm", "torchvision", "sct_convert"} <= set(eval(meta["versions"].replace("null", "None")))
    loaded = sct.load(path)
    assert sct.scales_of(loaded) == tuple(SCALES)
    xs, expected = _outputs(converted)
    _, got = _outputs(loaded)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_save_load_torchvision_and_custom(tmp_path):
    model, _ = sct.zoo.create_model("mobilenet_v3_small", "torchvision", num_classes=4)
    sct.convert(model, [64, 32]).eval()
    perturb_branches(model)
    path = sct.save(model, tmp_path / "tv.safetensors")
    assert metadata.read_metadata(path)["arch"] == "mobilenet_v3_small"
    loaded = sct.load(path)
    xs, expected = _outputs(model, [64, 32])
    assert all(torch.equal(a, b) for a, b in zip(_outputs(loaded, [64, 32])[1], expected))

    custom = torchvision.models.resnet18(num_classes=3)
    sct.convert(custom, [64, 32])
    path = sct.save(custom, tmp_path / "custom.safetensors", arch="")
    with pytest.raises(ValueError, match="pass the model"):
        sct.load(path)
    assert sct.scales_of(sct.load(path, model=torchvision.models.resnet18(num_classes=3))) == (64, 32)


def test_per_scale_exports_load_strictly_into_unmodified_model(converted, tmp_path):
    files = sct.save_per_scale(converted, tmp_path / "per_scale")
    assert [f.name for f in files] == ["test_resnet_96.safetensors", "test_resnet_64x48.safetensors"]
    xs, expected = _outputs(converted)
    for f, x, y in zip(files, xs, expected):
        plain = timm.create_model("test_resnet", num_classes=5)
        state = safetensors.torch.load_file(f)
        assert set(state) == set(plain.state_dict())
        plain.load_state_dict(state, strict=True)
        with torch.no_grad():
            assert_equivalent(plain.eval()(x), y)


def test_torchvision_mnasnet_export_needs_module_metadata(tmp_path):
    model = sct.convert(torchvision.models.mnasnet0_5(), [64, 32]).eval()
    path = io.export(model, 32, tmp_path / "mnas.safetensors")
    fresh = torchvision.models.mnasnet0_5()
    with pytest.raises(ValueError):  # torchvision refuses state dicts without versions
        fresh.load_state_dict(safetensors.torch.load_file(path))
    io.load_plain(fresh, path)


def test_foreign_corrupt_plain_and_mismatched_files(converted, tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="not written by sct.save"):
        sct.load(foreign)
    corrupt = tmp_path / "corrupt.safetensors"
    good = sct.save(converted, tmp_path / "good.safetensors")
    corrupt.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt"):
        sct.load(corrupt)
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        sct.load(tmp_path / "text.safetensors")
    plain = io.export(converted, 96, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="per-scale plain checkpoint"):
        sct.load(plain)
    with pytest.raises(ValueError, match="does not match"):
        sct.load(good, model=timm.create_model("test_efficientnet"))
    with pytest.raises(ValueError, match="holds scales"):
        sct.load(good, model=sct.convert(timm.create_model("test_resnet", num_classes=5), [96]))
    with pytest.raises(FileNotFoundError):
        sct.load(tmp_path / "missing.safetensors")


def test_failed_write_leaves_no_partial_file_and_keeps_the_old_one(converted, tmp_path, monkeypatch):
    target = tmp_path / "m.safetensors"
    sct.save(converted, target)
    old = target.read_bytes()

    def broken(tensors, filename, metadata=None, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "save_file", broken)  # the module that writes every file
    monkeypatch.setattr(files, "save_model", broken)
    with pytest.raises(ValueError, match="No space left"):
        sct.save(converted, target)
    assert target.read_bytes() == old
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_unwritable_outputs_are_clear_errors(converted, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        sct.save(converted, tmp_path / "nope" / "m.safetensors")
    with pytest.raises(ValueError, match="is a directory"):
        sct.save(converted, tmp_path)
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        sct.save_per_scale(converted, afile)


def test_pth_weights_load_weights_only(tmp_path):
    model = timm.create_model("test_resnet")
    pth = tmp_path / "w.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, pth)
    fresh = sct.load_weights(timm.create_model("test_resnet"), pth)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth", _use_new_zipfile_serialization=True)
    with pytest.raises(ValueError, match="not a plain weights file"):
        sct.load_weights(timm.create_model("test_resnet"), tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="does not match"):
        sct.load_weights(nn.Linear(2, 2), pth)


def test_describe_reports_overhead(converted, tmp_path):
    info = io.describe(sct.save(converted, tmp_path / "m.safetensors"))
    assert info["layers"] == 15 and info["scales"] == [96, (64, 48)]
    plain = timm.create_model("test_resnet")
    bn_params = sum(p.numel() for m in plain.modules() if sct.is_batch_norm(m) for p in m.parameters())
    assert info["params_per_extra_scale"] == bn_params


class TiedHead(nn.Module):  # a second head that shares the first one's weight (tied tensors)
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 4)
        self.mirror = nn.Linear(4, 4)
        self.mirror.weight = self.head.weight

    def forward(self, x):
        f = self.bn(self.conv(x)).mean((2, 3))
        return self.head(f) + self.mirror(f)


def test_tied_tensors_are_stored_once_and_tied_again_on_load(tmp_path):
    model = sct.convert(TiedHead(), [32, 16]).eval()
    perturb_branches(model)
    path = sct.save(model, tmp_path / "tied.safetensors")
    keys = safetensors.torch.load_file(path).keys()
    assert ("head.weight" in keys) != ("mirror.weight" in keys)  # one copy on disk
    loaded = sct.load(path, model=TiedHead()).eval()
    assert loaded.mirror.weight is loaded.head.weight
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_per_scale_file_of_a_tied_model_has_every_original_key_and_loads_strictly(tmp_path):
    # DESIGN: a per-scale file is the original state_dict's keys, so a tied tensor is written
    # under both names (safetensors' save_model would keep one and break load_file + strict).
    model = sct.convert(TiedHead(), [32, 16]).eval()
    perturb_branches(model)
    path = sct.export(model, 16, tmp_path / "tied_16.safetensors")
    state = safetensors.torch.load_file(path)
    plain = TiedHead()
    assert state.keys() == plain.state_dict().keys()
    plain.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), model(x))


def test_load_weights_takes_a_wrapped_checkpoint_as_the_cli_does(tmp_path):
    source = timm.create_model("test_resnet", num_classes=5)
    wrapped = {"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}}  # Lightning's layout
    torch.save(wrapped, tmp_path / "lightning.ckpt.pth")
    fresh = sct.load_weights(timm.create_model("test_resnet", num_classes=5), tmp_path / "lightning.ckpt.pth")
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in fresh.state_dict().items())
    with pytest.raises(sct.WeightsMismatchError, match="size mismatch for fc.weight"):
        sct.load_weights(timm.create_model("test_resnet", num_classes=3), tmp_path / "lightning.ckpt.pth")

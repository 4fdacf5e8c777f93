"""Post-hoc: per-scale calibration, adding and removing scales, branch divergence."""
import copy
import functools

import pytest
import timm
import torch
import torchvision
from _util import ConvBN, perturb_branches, converted_test_resnet

import sct_convert as sct
from sct_convert.training.diagnostics import branch_divergence, symmetric_kl


Net = functools.partial(ConvBN, classes=2, dropout=0.5, relu=True)


def batches(n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, size, size, generator=g) * 2 + 1 for _ in range(n)]


def test_statistics_are_the_exact_average_over_batches_per_scale():
    model = sct.convert(Net(), [32, 16]).train()
    perturb_branches(model)
    data = batches()
    before = copy.deepcopy(model.state_dict())
    sct.calibrate(model, data, num_batches=3, scales=[16], progress=False)
    assert model.training and model.drop.training  # state restored
    after = model.state_dict()
    for k in before:  # no weight and no other branch touched
        if ".branches.16.running" not in k and "num_batches" not in k:
            assert torch.equal(before[k], after[k]), k
    feats = [model.conv(sct.resize_to(x, (16, 16))) for x in data[:3]]
    with torch.no_grad():
        mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
        var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    assert torch.allclose(after["bn.branches.16.running_mean"], mean, atol=1e-5)
    assert torch.allclose(after["bn.branches.16.running_var"], var, atol=1e-5)
    assert model.bn.branches["16"].momentum == 0.1  # momentum restored


def test_data_as_tuples_dicts_and_no_grad():
    model = sct.convert(Net(), [32, 16])
    for data in ([(x, 0) for x in batches()], [{"image": x} for x in batches()]):
        sct.calibrate(model, data, num_batches=2, progress=False)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(TypeError, match="cannot find images"):
        sct.calibrate(model, [["a"]], progress=False)
    with pytest.raises(ValueError, match="no batches"):
        sct.calibrate(model, [], progress=False)


def test_frozen_branches_are_calibrated_too():
    model = sct.convert(Net(norm=torchvision.ops.FrozenBatchNorm2d), [32, 16])
    sct.calibrate(model, batches(), num_batches=2, scales=[16], progress=False)
    assert not torch.equal(model.bn.branches["16"].running_mean, torch.zeros(4))
    assert torch.equal(model.bn.branches["32"].running_mean, torch.zeros(4))
    assert isinstance(model.bn.branches["16"], torchvision.ops.FrozenBatchNorm2d)


def test_calibration_gives_each_scale_its_own_statistics():
    torch.manual_seed(0)
    model = sct.convert(timm.create_model("test_resnet", num_classes=3), [96, 64]).train()
    data = batches(6, 96)
    sct.calibrate(model, data, num_batches=6, progress=False)
    bn = model.bn1.branches
    assert not torch.allclose(bn["96"].running_mean, bn["64"].running_mean)


def test_add_and_remove_scale_are_seen_everywhere(tmp_path):
    _, model = converted_test_resnet([96, 64], num_classes=3)
    sct.add_scale(model, 80)  # side 80: halfway between 64 and 96 (the default interpolates)
    assert sct.scales_of(model) == (96, 64, 80)
    bn = model.bn1.branches
    # 6400 pixels: 0.45 of the way from 64 (4096) to 96 (9216), as unknown_scale="interpolate" blends
    assert torch.allclose(bn["80"].running_mean, torch.lerp(bn["64"].running_mean, bn["96"].running_mean, 0.45))
    sct.calibrate(model, batches(3, 96), num_batches=3, scales=[80], progress=False)
    x = torch.randn(1, 3, 80, 80)
    with torch.no_grad():
        assert sct.route(model, x) == 80
        assert torch.allclose(model(x), sct.extract(model, 80).eval()(x))
        scripted = torch.jit.script(model)
        assert torch.allclose(scripted(x), model(x), atol=1e-6)
    loaded = sct.load(sct.save(model, tmp_path / "m.safetensors"))
    assert sct.scales_of(loaded) == (96, 64, 80)
    sct.add_scale(model, (72, 64), init_from=96)
    assert torch.equal(model.bn1.branches["72x64"].running_var, model.bn1.branches["96"].running_var)
    sct.remove_scale(model, 64)
    assert sct.scales_of(model) == (96, 80, (72, 64)) and "64" not in model.bn1.branches
    x = torch.randn(1, 3, 80, 80)
    with torch.no_grad():
        assert sct.route(model, x) == 80
        assert torch.allclose(model(x), sct.extract(model, 80).eval()(x))
    with pytest.raises(ValueError, match="already one of"):
        sct.add_scale(model, 96)
    for s in (80, (72, 64)):
        sct.remove_scale(model, s)
    with pytest.raises(ValueError, match="only scale"):
        sct.remove_scale(model, 96)


def test_symmetric_kl_and_divergence_rows(tmp_path):
    mu, var = torch.zeros(3), torch.ones(3)
    assert symmetric_kl(mu, var, mu, var) == pytest.approx(0.0, abs=1e-9)
    # KL(N(0,1) || N(1,1)) = 0.5 each way
    assert symmetric_kl(mu, var, mu + 1, var, eps=0.0) == pytest.approx(0.5)
    _, model = converted_test_resnet([96, 64, 48], num_classes=3)
    rows = branch_divergence(model)
    layers = [n for n, _ in sct.scale_specific_layers(model)]
    assert [r["layer"] for r in rows[::3]] == layers
    assert {r["pair"] for r in rows} == {"96-64", "96-48", "64-48"}
    assert all(r["divergence"] > 0 for r in rows)
    pytest.importorskip("matplotlib")
    branch_divergence(model, plot=str(tmp_path / "div.png"))
    assert (tmp_path / "div.png").stat().st_size > 1000


def test_add_scale_interpolates_between_neighbouring_branches():
    model = sct.convert(Net(), [64, 32, 16])
    with torch.no_grad():
        for key, value in (("32", 1.0), ("16", 3.0), ("64", 5.0)):
            branch = model.bn.branches[key]
            branch.running_mean.fill_(value)
            branch.weight.fill_(value * 10)
    sct.add_scale(model, (16, 40))  # 640 pixels: halfway between 16 (256) and 32 (1024)
    new = model.bn.branches["16x40"]
    assert torch.allclose(new.running_mean, torch.full((4,), 2.0))
    assert torch.allclose(new.weight, torch.full((4,), 20.0))
    assert new.num_batches_tracked == model.bn.branches["16"].num_batches_tracked
    sct.add_scale(model, (32, 128), init_from="interpolate")  # 64 x 64 pixels: equals scale 64's
    assert torch.allclose(model.bn.branches["32x128"].running_mean, torch.full((4,), 5.0))
    sct.add_scale(model, 96, init_from="interpolate")  # outside the range: copy of the nearest
    assert torch.allclose(model.bn.branches["96"].running_mean, torch.full((4,), 5.0))
    model.eval()
    x = torch.randn(2, 3, 16, 40)
    with torch.no_grad():
        assert torch.allclose(model(x), sct.extract(model, (16, 40)).eval()(x))
    with pytest.raises(ValueError, match="'interpolate'"):
        sct.add_scale(model, 40, init_from="linear")


def test_asking_for_more_batches_than_the_data_holds_warns():
    model = sct.convert(timm.create_model("test_resnet", num_classes=3), [64, 32])
    data = [torch.randn(4, 3, 64, 64) for _ in range(2)]
    with pytest.warns(UserWarning, match=r"asked for 100 batches but the data holds 2 \(8 images\)"):
        sct.calibrate(model, data, progress=False)

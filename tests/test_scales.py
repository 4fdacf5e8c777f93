"""Scales as values (sct_convert/scales.py), and how the API and the CLI take them alike:
NumPy integers, the order rule, text and JSON round trips, branch keys."""
import numpy as np
import pytest
import torch
import torchvision
from _util import Clip, ConvBN
from click.testing import CliRunner

import sct_convert as sct
from sct_convert.core import scales as S
from sct_convert.cli import cli


Net = ConvBN


def test_numpy_and_torch_integers_are_scales():
    model = sct.convert(Net(), [np.int64(32), (np.int32(24), 16)])
    assert sct.scales_of(model) == (32, (24, 16))
    assert all(type(v) is int for v in (32, *sct.scales_of(model)[1]))
    assert S.normalize_scale(torch.tensor(8)) == (8, 8)
    for bad in (True, 1.5, "32", (32,), torch.tensor([8, 8])):
        with pytest.raises(ValueError, match="invalid scale"):
            S.normalize_scale(bad)


def test_scales_out_of_order_are_refused_alike_by_api_and_cli():
    with pytest.raises(ValueError, match=r"largest first.*pass scales=\[64, 32\]"):
        sct.convert(Net(), [32, 64])
    result = CliRunner().invoke(cli, ["test_resnet", "--scales", "32,64", "--out", "unused.safetensors"])
    assert result.exit_code == 1 and "largest first" in result.output and "--scales=64,32" in result.output
    assert len(result.output.strip().splitlines()) == 1
    sct.convert(Net(), [(16, 64), (32, 32), 24])  # equal pixel counts in either order, then fewer


def test_a_file_keeps_the_order_add_scale_left_it_in(tmp_path):
    model = sct.convert(Net(), [32, 16])
    sct.add_scale(model, 64)  # appended: not largest first, and the file keeps that layout
    path = sct.save(model, tmp_path / "m.safetensors")
    assert sct.scales_of(sct.load(path, model=Net())) == (32, 16, 64)


def test_text_json_and_branch_keys_round_trip():
    for s in (224, (128, 96)):
        assert S.parse_key(S.scale_key(s)) == s
    assert S.scales_from_json(S.scales_to_json([224, (128, 96)])) == [224, (128, 96)]
    key = S.branch_key("layer1.0.bn1", "128x96", "running_mean")
    assert key == "layer1.0.bn1.branches.128x96.running_mean"
    assert S.split_branch_key(key) == ("layer1.0.bn1", "128x96", "running_mean")
    assert S.split_branch_key("fc.weight") is None
    model = sct.convert(Net(), [32, 16])
    assert S.is_branched(model.state_dict()) and not S.is_branched(Net().state_dict())
    assert S.largest_index([16, (8, 64), 32]) == 2 and S.smallest_index([16, (8, 32), 32]) == 0


def test_a_detector_converted_without_its_transforms_size_warns_at_convert_time():
    plain = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=3)
    with pytest.warns(UserWarning, match=r"transform resizes to 320, which is not one of the scales 192, 144"):
        sct.convert(plain, [192, 144])


def test_inspect_shows_a_clip_files_five_dimensional_input(tmp_path):
    clip = sct.convert(Clip(), [16, 12], example_input=torch.randn(1, 3, 4, 16, 16)).eval()
    path = sct.export_program(clip, tmp_path / "clip.pt2", example_input=torch.randn(2, 3, 4, 16, 16))
    result = CliRunner().invoke(cli, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "(N, 3, T, H, W)" in result.output

"""The sct-convert CLI: the main job, inspect/export, and one-line errors for bad input."""
import subprocess
import sys

import pytest
import safetensors.torch
import timm
from _util import converted_test_resnet
from click.testing import CliRunner

from sct_convert.cli import cli


def run(*args):
    result = CliRunner().invoke(cli, list(map(str, args)))
    return result


def assert_one_line_error(result, match):
    assert result.exit_code != 0
    text = result.output.strip()
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    assert text.startswith("Error: ") and match in text, text


def test_convert_inspect_export(tmp_path):
    out = tmp_path / "m.safetensors"
    r = run("test_resnet", "--out", out, "--scales", "96,64x48", "--num-classes", "5", "--per-scale", tmp_path / "ps")
    assert r.exit_code == 0, r.output
    assert "15 batch-norm layers x 2 scales (96, 64x48)" in r.output
    assert sorted(p.name for p in (tmp_path / "ps").iterdir()) == ["test_resnet_64x48.safetensors", "test_resnet_96.safetensors"]
    r = run("inspect", out)
    assert r.exit_code == 0 and "test_resnet (timm)" in r.output and "S-BN layers:     15" in r.output
    r = run("export", out, "--scale", "64x48", "--out", tmp_path / "e.safetensors")
    assert r.exit_code == 0, r.output
    plain = timm.create_model("test_resnet", num_classes=5)
    plain.load_state_dict(safetensors.torch.load_file(tmp_path / "e.safetensors"), strict=True)


@pytest.mark.parametrize("scale", ["48", "64"])
def test_export_scale_writes_that_scales_branch(tmp_path, scale):
    """Every branch differs (as after training): the exported file must hold the asked one."""
    import torch

    import sct_convert as sct

    _, model = converted_test_resnet([64, 48], num_classes=5)
    combined = sct.save(model, tmp_path / "m.safetensors")
    r = run("export", combined, "--scale", scale, "--out", tmp_path / "e.safetensors")
    assert r.exit_code == 0, r.output
    plain = timm.create_model("test_resnet", num_classes=5).eval()
    plain.load_state_dict(safetensors.torch.load_file(tmp_path / "e.safetensors"), strict=True)
    x = torch.randn(2, 3, int(scale), int(scale))
    other = "64" if scale == "48" else "48"
    with torch.no_grad(), sct.scale(model, int(scale)):
        want = model(x)
    with torch.no_grad(), sct.scale(model, int(other)):
        wrong = model(x)
    with torch.no_grad():
        got = plain(x)
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, wrong, atol=1e-3)


def test_export_model_names_the_architecture_a_file_lacks(tmp_path):
    """--model: a file written for a custom-built model records no timm name; --model gives it."""
    import torch

    import sct_convert as sct

    _, model = converted_test_resnet([64, 48], num_classes=1000)  # the default head, as --model builds it
    combined = sct.save(model, tmp_path / "m.safetensors", arch="", source="custom")
    r = run("export", combined, "--scale", "48", "--out", tmp_path / "e.safetensors")
    assert_one_line_error(r, "records no timm/torchvision architecture")
    r = run("export", combined, "--scale", "48", "--out", tmp_path / "e.safetensors", "--model", "test_resnet")
    assert r.exit_code == 0, r.output
    plain = timm.create_model("test_resnet").eval()
    plain.load_state_dict(safetensors.torch.load_file(tmp_path / "e.safetensors"), strict=True)
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(plain(x), model(x), atol=1e-5)


def test_warnings_are_one_line_each(tmp_path, monkeypatch):
    import sct_convert.checkpoints.zoo
    from _util import TrainOnlyHead

    monkeypatch.setattr(sct_convert.checkpoints.zoo, "create_model", lambda *a, **k: (TrainOnlyHead(), "timm"))
    r = run("train_only_head", "--scales", "32,8", "--out", tmp_path / "m.safetensors")
    assert r.exit_code == 0, r.output
    warning = [line for line in r.stderr.splitlines() if "scale 8" in line]
    assert len(warning) == 1 and warning[0].startswith("Warning: scale 8: "), r.stderr
    assert "cli.py" not in r.stderr and "converted timm train_only_head" in r.stdout


def test_checkpoint_and_torchvision_source(tmp_path):
    import torchvision
    import torch

    w = tmp_path / "w.pth"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), w)
    r = run("resnet18", "--source", "torchvision", "--num-classes", "3", "--checkpoint", w,
            "--scales", "64,32", "--out", tmp_path / "m.safetensors")
    assert r.exit_code == 0, r.output
    assert "torchvision resnet18" in r.output
    # the checkpoint's weights are in the file: in every branch of each BN, and in the shared layers
    weights, written = torch.load(w, weights_only=True), safetensors.torch.load_file(tmp_path / "m.safetensors")
    assert torch.equal(written["fc.weight"], weights["fc.weight"]) and torch.equal(written["conv1.weight"], weights["conv1.weight"])
    for s in ("64", "32"):
        assert torch.equal(written[f"bn1.branches.{s}.running_var"], weights["bn1.running_var"])


@pytest.mark.parametrize("args,match", [
    (["resnet5O"], "did you mean resnet50"),
    (["test_resnet", "--scales", "96,96"], "duplicate scale"),
    (["test_resnet", "--scales", "96,abc"], "bad scale"),
    (["test_resnet", "--scales", "96,0"], "positive"),
    (["test_vit"], "no batch-norm layer"),
    (["test_resnet", "--pretrained"], "not in the local cache"),
    (["inception_v3", "--scales", "160,64"], "cannot run at scale 64"),
    (["test_resnet", "--checkpoint", "missing.pth"], "no such checkpoint"),
])
def test_convert_bad_input(tmp_path, args, match):
    extra = [] if "--out" in args else ["--out", str(tmp_path / "x.safetensors")]
    assert_one_line_error(run(*args, *extra), match)
    assert not (tmp_path / "x.safetensors").exists()


def test_unknown_model_suggests_each_close_name_once(tmp_path):
    r = run("resnet5O", "--out", tmp_path / "x.safetensors")  # resnet50 is in timm and torchvision
    suggested = r.output.strip().split("did you mean ")[1].rstrip("?").split(", ")
    assert "resnet50" in suggested and len(suggested) == len(set(suggested))


def test_unwritable_output_and_bad_files(tmp_path):
    assert_one_line_error(run("test_resnet", "--out", tmp_path / "no" / "x.safetensors"), "does not exist")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    assert_one_line_error(run("inspect", bad), "not a readable safetensors")
    assert_one_line_error(run("inspect", tmp_path / "none.safetensors"), "no such file")
    good = tmp_path / "m.safetensors"
    assert run("test_resnet", "--scales", "96,64", "--out", good).exit_code == 0
    assert_one_line_error(run("export", good, "--scale", "128", "--out", tmp_path / "e.safetensors"),
                          "scale 128 is not in")
    assert_one_line_error(run("export", good, "--scale", "big", "--out", tmp_path / "e.safetensors"),
                          "bad scale")


def test_console_script_entry_point_errors_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sct_convert.cli", "nosuchmodel_xyz", "--out",
                           str(tmp_path / "x.safetensors")], capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("Error: unknown model 'nosuchmodel_xyz'")
    assert len(proc.stderr.strip().splitlines()) == 1


def _image_folder(root, n=6, size=40):
    from PIL import Image

    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(n // 2):
            Image.new("RGB", (size, size), color=(i * 40, 100, 200 - i * 30)).save(root / cls / f"{i}.png")
    return root


def test_calibrate_and_diagnose(tmp_path):
    from safetensors.torch import load_file

    good = tmp_path / "m.safetensors"
    assert run("test_resnet", "--scales", "96,64", "--out", good).exit_code == 0
    images = _image_folder(tmp_path / "imgs")
    out = tmp_path / "cal.safetensors"
    r = run("calibrate", good, "--images", images, "--out", out, "--batches", "2", "--batch-size", "3",
            "--add-scale", "80")
    assert r.exit_code == 0, r.output
    assert "calibrated 3 scales on 2 batches" in r.output
    before, after = load_file(good), load_file(out)
    assert not torch_equal(before["bn1.branches.64.running_mean"], after["bn1.branches.64.running_mean"])
    assert "bn1.branches.80.running_mean" in after
    r = run("diagnose", out, "--plot", tmp_path / "d.png")
    assert r.exit_code == 0, r.output
    assert "96-64" in r.output and (tmp_path / "d.png").exists()
    assert_one_line_error(run("calibrate", good, "--images", tmp_path / "nope", "--out", out), "does not exist")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("calibrate", good, "--images", tmp_path / "empty", "--out", out), "cannot read images")


def torch_equal(a, b):
    import torch

    return torch.equal(a, b)


def test_no_existing_file_is_changed_by_a_command_that_fails(tmp_path):
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(b"keep me")
    blocker = tmp_path / "somefile"
    blocker.write_text("a file, not a directory")
    r = run("test_resnet", "--out", victim, "--scales", "64,32", "--per-scale", blocker / "sub")
    assert_one_line_error(r, "is a file")
    assert victim.read_bytes() == b"keep me"

    combined = tmp_path / "m.safetensors"
    assert run("test_resnet", "--out", combined, "--scales", "64,32").exit_code == 0
    before = combined.read_bytes()
    for same in (combined, tmp_path / "." / "m.safetensors"):
        r = run("export", combined, "--scale", "32", "--out", same)
        assert_one_line_error(r, "is the input file")
    assert combined.read_bytes() == before


@pytest.mark.parametrize("args,match", [
    (["test_resnet", "--num-classes", "0", "--out", "m.safetensors"], "--num-classes"),
    (["test_resnet"], "Missing option '--out'"),
    (["test_resnet", "--out", "."], "is a directory"),
])
def test_usage_errors_are_one_line_and_exit_1(args, match, capsys, tmp_path, monkeypatch):
    from sct_convert.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("Error: ") and match in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_converted_models_training_checkpoint_exports_per_scale(tmp_path):
    """A checkpoint as timm's train.py writes it (its CheckpointSaver: args as argparse.Namespace,
    weights under state_dict, EMA under state_dict_ema) of a model converted with the README's two lines."""
    import argparse

    import torch

    import sct_convert as sct

    _, model = converted_test_resnet([64, 32], num_classes=3)
    # timm's own CheckpointSaver, as train.py uses it (args, optimizer, EMA)
    from timm.utils import CheckpointSaver, ModelEmaV3

    saver = CheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1),
                            args=argparse.Namespace(lr=0.1, model="test_resnet"),
                            model_ema=ModelEmaV3(model), checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    saver.save_checkpoint(epoch=3, metric=0.5)
    ckpt = tmp_path / "last.pth.tar"
    assert "args" in torch.load(ckpt, weights_only=False)
    out, per = tmp_path / "m.safetensors", tmp_path / "per"
    r = run("test_resnet", "--checkpoint", ckpt, "--scales", "64,32", "--num-classes", "3",
            "--out", out, "--per-scale", per)
    assert r.exit_code == 0, r.output
    for s in (64, 32):
        plain = sct.load_plain(timm.create_model("test_resnet", num_classes=3), per / f"test_resnet_{s}.safetensors")
        x = torch.randn(1, 3, s, s)
        with torch.no_grad():
            assert torch.equal(plain.eval()(x), model(x)), s
    r = run("test_resnet", "--checkpoint", ckpt, "--scales", "64,48", "--num-classes", "3", "--out", out)
    assert_one_line_error(r, "pass --scales 32,64")
    # anything else pickled is still refused, with what was found and the safe way
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "obj": torch.nn.ReLU()}, evil)
    r = run("test_resnet", "--checkpoint", evil, "--out", tmp_path / "e.safetensors")
    assert_one_line_error(r, "safetensors")
    assert "weights_only" not in r.output and not (tmp_path / "e.safetensors").exists()


def test_export_scale_errors_name_the_option(tmp_path):
    combined = tmp_path / "m.safetensors"
    assert run("test_resnet", "--out", combined, "--scales", "64,32").exit_code == 0
    assert_one_line_error(run("export", combined, "--scale", "abc", "--out", tmp_path / "e.safetensors"),
                          "bad scale 'abc' in --scale 'abc'")
    assert_one_line_error(run("export", combined, "--scale", "64,32", "--out", tmp_path / "e.safetensors"),
                          "--scale takes one scale")


def test_diagnose_plot_of_identical_branches_says_so(tmp_path):
    combined = tmp_path / "m.safetensors"
    assert run("test_resnet", "--out", combined, "--scales", "64,32").exit_code == 0
    r = run("diagnose", combined, "--plot", tmp_path / "d.png")
    assert_one_line_error(r, "same statistics")
    assert not (tmp_path / "d.png").exists()


def test_a_scale_the_stem_reduces_to_one_pixel_warns(tmp_path):
    r = run("test_resnet", "--out", tmp_path / "m.safetensors", "--scales", "64,1")
    assert r.exit_code == 0, r.output
    lines = [line for line in r.output.splitlines() if line.startswith("Warning:")]
    assert any("scale 1" in line and "single pixel" in line for line in lines), r.output


def test_unknown_scale_choices_are_the_routing_policies_and_round_trip(tmp_path):
    from sct_convert.core.context import ROUTING_POLICIES

    option = next(p for p in cli.commands["convert"].params if p.name == "unknown_scale")
    assert tuple(option.type.choices) == ROUTING_POLICIES
    out = tmp_path / "m.safetensors"
    result = CliRunner().invoke(cli, ["convert", "test_resnet", "--out", str(out), "--scales", "96,64",
                                      "--unknown-scale", "interpolate"])
    assert result.exit_code == 0, result.output
    info = CliRunner().invoke(cli, ["inspect", str(out)])
    assert "unknown scale:   interpolate" in info.output


@pytest.mark.parametrize("name, shape", [("lraspp_mobilenet_v3_large", (1, 3, 48, 48)),
                                         ("r3d_18", (1, 3, 5, 48, 48))])
def test_torchvision_segmentation_and_video_models_by_name(tmp_path, name, shape):
    import torch

    import sct_convert as sct

    out = tmp_path / "m.safetensors"
    r = run(name, "--out", out, "--scales", "64,48", "--num-classes", "5")
    assert r.exit_code == 0, r.output
    assert f"converted torchvision {name}" in r.output
    model = sct.load(out).eval()  # rebuilt offline from the file: class count kept
    with torch.no_grad():
        output = model(torch.randn(shape))
    logits = output["out"] if isinstance(output, dict) else output
    assert logits.shape[1] == 5


def test_torchvision_names_outside_the_converted_families_are_named_not_unknown(tmp_path):
    r = run("raft_small", "--out", tmp_path / "m.safetensors")
    assert_one_line_error(r, "'raft_small' is a torchvision optical flow model")
    assert "unknown" not in r.output

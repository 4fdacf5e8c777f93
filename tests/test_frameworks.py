"""Drop-in where people train: Hugging Face Accelerate, timm's scheduled batch sizes, Lightning
(the real libraries, CPU, bf16 autocast). Each test skips only for the library it needs."""
import pytest
import timm
import torch

import sct_convert as sct

def test_accelerate_bf16_trains_every_branch_and_saves(tmp_path):
    pytest.importorskip("accelerate")
    from accelerate import Accelerator
    from accelerate.utils import send_to_device

    torch.manual_seed(0)
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    model = sct.convert(timm.create_model("test_resnet", num_classes=3), [64, 32])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    data = [(torch.randn(4, 3, 64, 64), torch.randint(0, 3, (4,))) for _ in range(3)]
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    criterion = sct.SCTLoss(torch.nn.CrossEntropyLoss())
    model.train()
    for x, y in loader:
        out = model(x)  # accelerate wraps forward in convert_outputs_to_fp32
        assert isinstance(out, sct.ScaleOutputs) and out.scales == (64, 32)
        assert all(o.dtype == torch.float32 for o in out)
        assert send_to_device(out, "cpu").scales == (64, 32)
        optimizer.zero_grad()
        accelerator.backward(criterion(out, y))
        inner = accelerator.unwrap_model(model)
        for key in ("64", "32"):
            assert inner.bn1.branches[key].weight.grad is not None, key
        optimizer.step()
    inner = accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # drops accelerate's autocast forward
    path = sct.save(inner, tmp_path / "m.safetensors")
    loaded = sct.load(path).eval()
    inner.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), inner(x))


def test_timm_scheduled_batch_sizes_train_each_batchs_own_branch(tmp_path):
    """timm >= 1.0.29's per-batch input sizes (train.py --train-img-sizes): with sampling off,
    a batch at size s trains branch s only (the one-scale-per-step form of SCT)."""
    import inspect

    from PIL import Image
    from timm.data import ImageDataset, create_loader

    if "input_size_choices" not in inspect.signature(create_loader).parameters:
        pytest.skip(f"timm {timm.__version__} has no per-batch input sizes (timm >= 1.0.29)")
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(4):
            Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()).save(tmp_path / cls / f"{i}.png")
    loader = create_loader(
        ImageDataset(str(tmp_path)), input_size=(3, 64, 64), batch_size=2, is_training=True,
        use_prefetcher=False, num_workers=0, persistent_workers=False, device=torch.device("cpu"),
        input_size_choices=[64, 32])
    model = sct.convert(timm.create_model("test_resnet", num_classes=2), [64, 32], sampling=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    criterion = torch.nn.CrossEntropyLoss()
    model.train()
    seen = set()
    for x, y in loader:
        size = int(x.shape[-1])
        seen.add(size)
        other = "32" if size == 64 else "64"
        before = {k: v.clone() for k, v in model.state_dict().items() if f".branches.{other}." in k}
        own_mean = model.bn1.branches[str(size)].running_mean.clone()
        optimizer.zero_grad()
        out = model(x)
        assert isinstance(out, torch.Tensor)  # sampling off: the model's own output
        criterion(out, y).backward()
        assert model.bn1.branches[str(size)].weight.grad is not None
        assert model.bn1.branches[other].weight.grad is None
        optimizer.step()
        after = model.state_dict()
        assert all(torch.equal(v, after[k]) for k, v in before.items())  # the other branch is untouched
        assert not torch.equal(own_mean, model.bn1.branches[str(size)].running_mean)
    assert seen == {64, 32}


def test_lightning_bf16_fit_checkpoint_and_per_scale_export(tmp_path):
    pytest.importorskip("lightning")
    import importlib.util
    from pathlib import Path

    import lightning as L
    from click.testing import CliRunner

    from sct_convert.cli import cli

    spec = importlib.util.spec_from_file_location(
        "lightning_sct", Path(__file__).resolve().parents[1] / "examples" / "lightning_sct.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    torch.manual_seed(0)
    module = example.SCTClassifier("test_resnet", num_classes=3, scales=[64, 32])
    initial = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = L.Trainer(max_steps=3, precision="bf16-mixed", accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, limit_val_batches=1, val_check_interval=3)
    trainer.fit(module, example.fake_loader(64, 12, 3, 4), example.fake_loader(64, 4, 3, 4))
    assert {"val/acc_64", "val/acc_32"} <= set(trainer.callback_metrics)
    trained = module.model.state_dict()
    for key in ("64", "32"):  # sampling trained every branch
        name = f"bn1.branches.{key}.weight"
        assert not torch.equal(trained[name], initial[name]), key
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    restored = example.SCTClassifier.load_from_checkpoint(ckpt).model
    assert all(torch.equal(v, restored.state_dict()[k]) for k, v in trained.items())
    # from the Lightning checkpoint to per-scale plain files
    result = CliRunner().invoke(cli, ["test_resnet", "--checkpoint", str(ckpt), "--scales", "64,32",
                                      "--num-classes", "3", "--out", str(tmp_path / "m.safetensors"),
                                      "--per-scale", str(tmp_path / "per")])
    assert result.exit_code == 0, result.output
    plain = sct.load_plain(timm.create_model("test_resnet", num_classes=3), tmp_path / "per" / "test_resnet_32.safetensors")
    module.model.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), module.model(x))

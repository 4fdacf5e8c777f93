"""Drop-in where people train: Hugging Face Accelerate (real library, CPU, bf16 autocast)."""
import pytest
import timm
import torch

import sct_convert as sct

accelerate = pytest.importorskip("accelerate")


def test_accelerate_bf16_trains_every_branch_and_saves(tmp_path):
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

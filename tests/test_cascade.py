"""Anytime serving: a cascade answers each row at the smallest scale confident of it; its
thresholds are fitted on labelled data, survive save / load / export, and the torch-free runtime
serves exactly what the eager cascade does."""
import json
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torchvision

import sct_convert as sct
from sct_convert.serving.cascade import confidence_of, count_macs

from _util import Clip, converted_test_resnet, perturb_branches

SCALES = [64, 48, 32]


@pytest.fixture(scope="module")
def model():
    return converted_test_resnet(SCALES)[1]


def images(n=24, size=64, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def midpoint_threshold(model, x, s, share=0.5):
    """A threshold that answers about ``share`` of ``x`` at scale ``s``, halfway between two
    confidences (no row sits on it, in any runtime)."""
    with torch.no_grad(), sct.scale(model, s):
        conf = confidence_of(model(sct.resize_to(x, (s, s))), "softmax").sort().values
    k = int(len(conf) * (1 - share))
    return float((conf[k - 1] + conf[k]) / 2)


def by_hand(model, x, thresholds):
    """The cascade, one stage at a time, the way its definition reads."""
    rows, logits, answered = torch.arange(len(x)), torch.zeros(len(x), 5), torch.zeros(len(x), dtype=torch.long)
    stages = sorted(thresholds, key=lambda s: s)
    for s in stages:
        with torch.no_grad(), sct.scale(model, s):
            out = model(sct.resize_to(x[rows], (s, s)))
        keep = torch.ones(len(rows), dtype=torch.bool) if s == stages[-1] else \
            torch.softmax(out, 1).max(1).values >= thresholds[s]
        logits[rows[keep]], answered[rows[keep]] = out[keep], s
        rows = rows[~keep]
    return logits, answered


@pytest.fixture(scope="module")
def cascade(model):
    x = images()
    return sct.Cascade(model, {32: midpoint_threshold(model, x, 32, 0.4), 48: midpoint_threshold(model, x, 48, 0.5),
                               64: None})


def test_the_cascade_is_each_stage_run_by_hand(model, cascade):
    x = images()
    result = cascade.run(x)
    logits, answered = by_hand(model, x, cascade.thresholds)
    assert torch.equal(result.scales, answered)
    torch.testing.assert_close(result.logits, logits, rtol=1e-5, atol=1e-6)
    assert set(result.scales.tolist()) == {32, 48, 64}  # every stage answered some rows
    torch.testing.assert_close(cascade(x), result.logits)
    macs = {s: count_macs(model, (s, s)) for s in SCALES}
    spent = {32: macs[32], 48: macs[32] + macs[48], 64: macs[32] + macs[48] + macs[64]}
    assert result.macs.tolist() == [spent[s] for s in result.scales.tolist()]
    assert macs[32] < macs[48] < macs[64]


def test_each_stage_resizes_the_original_input(model, cascade):
    small = images(size=40, seed=3)  # any size: each stage resizes it, never a stage's output
    result = cascade.run(small)
    logits, answered = by_hand(model, small, cascade.thresholds)
    assert torch.equal(result.scales, answered)
    torch.testing.assert_close(result.logits, logits, rtol=1e-5, atol=1e-6)


def test_margin_confidence_and_stage_subsets():
    model = converted_test_resnet(SCALES)[1]
    x = images()
    two = sct.Cascade(model, {32: 0.2, 64: 1.0}, confidence="margin")
    result = two.run(x)
    with torch.no_grad(), sct.scale(model, 32):
        p = torch.softmax(model(sct.resize_to(x, (32, 32))), 1).topk(2, 1).values
    assert torch.equal(result.scales == 32, p[:, 0] - p[:, 1] >= 0.2)
    assert set(result.scales.tolist()) <= {32, 64}


def test_clips_cascade_like_images():
    torch.manual_seed(0)
    model = sct.convert(Clip(), [32, 16], example_input=torch.randn(1, 3, 4, 32, 32)).eval()
    perturb_branches(model)
    x = torch.randn(6, 3, 4, 32, 32)
    with torch.no_grad(), sct.scale(model, 16):
        small = model(sct.resize_to(x, (16, 16)))
    top = torch.softmax(small, 1).max(1).values
    ranked = top.sort().values
    cut = float((ranked[2] + ranked[3]) / 2)  # between two rows: half answer at 16, whatever the precision
    result = sct.Cascade(model, {16: cut, 32: None}).run(x)
    assert torch.equal(result.scales == 16, top >= cut)
    assert (result.scales == 16).sum() == 3


def fit_data(model, n=64, seed=1):
    """Labelled data the model gets partly right: labels are its largest scale's predictions,
    with a quarter replaced at random."""
    x = images(n, seed=seed)
    with torch.no_grad(), sct.scale(model, 64):
        y = model(x).argmax(1)
    g = torch.Generator().manual_seed(seed)
    noisy = torch.rand(n, generator=g) < 0.25
    y[noisy] = torch.randint(0, 5, (int(noisy.sum()),), generator=g)
    return [(x[:32], y[:32]), (x[32:], y[32:])]


def test_fit_picks_the_cheapest_cascade_within_the_drop(model):
    data = fit_data(model)
    exact = sct.fit_cascade(model, data, max_drop=0.0)
    report = exact.report
    best = max(acc for acc, _ in report.single_scale.values())
    assert report.top1 >= best - 1e-9
    assert abs(sum(report.answered.values()) - 1.0) < 1e-9
    loose = sct.fit_cascade(model, data, max_drop=100.0)  # any accuracy: the cheapest, one pass at 32
    assert list(loose.thresholds) == [32] and loose.report.relative_macs == pytest.approx(
        count_macs(model, (32, 32)) / count_macs(model, (64, 64)))
    assert loose.report.relative_macs <= report.relative_macs
    x = torch.cat([b[0] for b in data])  # the report is what the cascade does on the fit data
    y = torch.cat([b[1] for b in data])
    result = exact.run(x)
    assert 100 * (result.logits.argmax(1) == y).float().mean().item() == pytest.approx(report.top1)
    largest = count_macs(model, (64, 64))
    assert result.macs.float().mean().item() / largest == pytest.approx(report.relative_macs)


def test_fit_under_a_budget_and_on_given_stages(model):
    data = fit_data(model)
    fitted = sct.fit_cascade(model, data, budget=0.5)
    assert fitted.report.relative_macs <= 0.5
    staged = sct.fit_cascade(model, data, stages=[48, 32], max_drop=0.0)
    assert set(staged.thresholds) <= {48, 32}


def test_bad_input_is_refused_in_one_line(model):
    data = fit_data(model)
    for thresholds, match in (({32: 0.0, 64: None}, r"\(0, 1\]"), ({32: 1.5, 64: None}, r"\(0, 1\]"),
                              ({32: None, 64: None}, r"\(0, 1\]"), ({33: 0.5, 64: None}, "not one of this model's"),
                              ({}, "maps each stage")):
        with pytest.raises(ValueError, match=match):
            sct.Cascade(model, thresholds)
    with pytest.raises(ValueError, match="max_drop"):
        sct.fit_cascade(model, data, max_drop=-1)
    with pytest.raises(ValueError, match="labelled data"):
        sct.fit_cascade(model, [images(4)])
    with pytest.raises(ValueError, match="budget"):
        sct.fit_cascade(model, data, budget=0)
    with pytest.raises(ValueError, match="converted"):
        sct.Cascade(torchvision.models.resnet18(num_classes=3), {32: None})
    segmentation = sct.convert(torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=3), [64, 32]).eval()
    with pytest.raises(ValueError, match="per-image class scores"):
        sct.Cascade(segmentation, {32: 0.5, 64: None}).run(images(2))
    with pytest.warns(UserWarning):
        detector = sct.convert(torchvision.models.detection.ssdlite320_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=3), [256, 192])
    with pytest.raises(ValueError, match="detector has no per-image confidence"):
        sct.Cascade(detector, {192: 0.5, 256: None})
    model.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            sct.Cascade(model, {32: 0.5, 64: None}).run(images(2))
    finally:
        model.eval()


def test_thresholds_survive_save_and_load(model, cascade, tmp_path):
    path = sct.save(cascade, tmp_path / "m.safetensors", arch="test_resnet", source="timm")
    again = sct.load_cascade(path)
    assert again.thresholds == cascade.thresholds and again.confidence == cascade.confidence
    x = images(seed=5)
    torch.testing.assert_close(again.run(x).logits, cascade.run(x).logits)
    plain = sct.save(model, tmp_path / "plain.safetensors", arch="test_resnet", source="timm")
    with pytest.raises(ValueError, match="records no cascade"):
        sct.load_cascade(plain)


@pytest.fixture(scope="module")
def cascade_file(cascade, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    return sct.export_onnx(cascade, tmp_path_factory.mktemp("cascade") / "m.onnx")


@pytest.mark.slow
def test_the_runtime_serves_what_the_eager_cascade_does(cascade, cascade_file):
    from sct_convert.deploy.api import read_deploy_metadata
    from sct_convert.runtime import CascadeSession

    spec = json.loads(read_deploy_metadata(cascade_file)["cascade"])
    assert [st["threshold"] for st in spec["stages"]] == list(cascade.thresholds.values())
    session = CascadeSession(str(cascade_file))
    for x in (images(seed=7), images(size=80, seed=8), images(size=40, seed=9)):
        want, got = cascade.run(x), session.run(x.numpy())
        assert np.array_equal(got.scales, want.scales.numpy()) and np.array_equal(got.macs, want.macs.numpy())
        np.testing.assert_allclose(got.logits, want.logits.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_runtime_threads_each_get_their_own_answer(cascade, cascade_file):
    from sct_convert.runtime import CascadeSession

    session = CascadeSession(str(cascade_file))
    batches = [images(n=8, seed=s).numpy() for s in range(8)]
    alone = [session.run(b) for b in batches]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(session.run, batches * 3))
    for i, got in enumerate(together):
        want = alone[i % len(batches)]
        assert np.array_equal(got.scales, want.scales) and np.array_equal(got.logits, want.logits)


@pytest.mark.slow
def test_the_runtime_needs_no_torch(cascade, cascade_file, tmp_path):
    x = images(seed=11)
    np.save(tmp_path / "x.npy", x.numpy())
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any import of torch fails
        import numpy as np
        from sct_convert.runtime import CascadeSession
        result = CascadeSession({str(cascade_file)!r}).run(np.load({str(tmp_path / 'x.npy')!r}))
        np.save({str(tmp_path / 'scales.npy')!r}, result.scales)
        assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None and m.split(".")[0] == "torch"]
    """)
    subprocess.run([sys.executable, "-c", code], check=True)
    assert np.array_equal(np.load(tmp_path / "scales.npy"), cascade.run(x).scales.numpy())


def test_cli_fits_a_cascade_into_the_model_file_and_evaluate_plots_it(folder, tmp_path):
    import csv

    from click.testing import CliRunner

    from sct_convert.cli import cli

    model = converted_test_resnet(SCALES, num_classes=3)[1]
    path = sct.save(model, tmp_path / "m.safetensors", arch="test_resnet", source="timm")
    r = CliRunner().invoke(cli, ["cascade", str(path), "--images", str(folder), "--max-drop", "1", "--out", str(path)])
    assert r.exit_code == 0, r.output
    assert "cascade" in r.output and "top-1" in r.output and "fit cascade" in r.output  # the report, progress
    fitted = sct.load_cascade(path)
    assert set(fitted.thresholds) <= set(SCALES)
    bad = CliRunner().invoke(cli, ["cascade", str(path), "--images", str(folder), "--max-drop", "-1",
                                   "--out", str(path)])
    assert bad.exit_code != 0 and len(bad.output.strip().splitlines()) == 1 and "max_drop" in bad.output
    out, plot = tmp_path / "r.csv", tmp_path / "r.png"
    r = CliRunner().invoke(cli, ["evaluate", str(path), "--images", str(folder), "--scales", "64,48,32", "--cascade",
                                 "--latency-repeats", "0", "--out", str(out), "--plot", str(plot)])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(out)))
    cascades = [row for row in rows if row["scale"] == "cascade"]
    assert [row["arm"] for row in cascades] == [f"trained cascade max_drop={d}" for d in ("0", "0.3", "0.5", "1")]
    assert all(0 < float(row["relative_macs"]) <= 1 for row in cascades)
    assert [float(row["relative_macs"]) for row in rows if row["scale"] == "64"] == [1.0]
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_cli_cascade_budget_and_stages_are_the_fit_they_ask_for(folder, tmp_path):
    from click.testing import CliRunner

    from sct_convert.cli import cli
    from sct_convert.evaluation.data import image_dataset, loader_at, resolve_data_config, split_indices

    model = converted_test_resnet(SCALES, num_classes=3)[1]
    path = sct.save(model, tmp_path / "m.safetensors", arch="test_resnet", source="timm")
    config = resolve_data_config(model)
    dataset = image_dataset(folder, config)
    loader = list(loader_at(dataset, split_indices(len(dataset), 0, None)[0], config, (64, 64), 64, 0))
    for option, value, kwargs in (("--stages", "48,32", {"stages": [48, 32], "max_drop": 1.0}),
                                  ("--budget", "0.5", {"budget": 0.5})):
        out = tmp_path / f"{option[2:]}.safetensors"
        args = ["cascade", str(path), "--images", str(folder), option, value, "--out", str(out)]
        r = CliRunner().invoke(cli, args + (["--max-drop", "1"] if option == "--stages" else []))
        assert r.exit_code == 0, r.output
        want = sct.fit_cascade(sct.load(path).eval(), loader, **kwargs)
        got = sct.load_cascade(out)
        assert got.thresholds == want.thresholds, option
        if option == "--stages":
            assert set(got.thresholds) <= {48, 32}
        else:
            assert want.report.relative_macs <= 0.5

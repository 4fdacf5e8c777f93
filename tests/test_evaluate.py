"""sct.evaluate / sct-convert evaluate: per-scale accuracy of a plain, calibrated or trained model,
preprocessed as timm's validate.py does, and a report in CSV / Markdown / JSON with a plot."""
import csv
import json
import warnings

import pytest
import safetensors.torch
import timm
import timm.data
import torch
from click.testing import CliRunner

import sct_convert as sct
from sct_convert.cli import cli

SCALES = [64, 48, 32]


def timm_transform(model, size):
    config = timm.data.resolve_data_config({}, model=model)
    return timm.data.create_transform(input_size=(3, size, size), interpolation=config["interpolation"],
                                      mean=config["mean"], std=config["std"], crop_pct=config["crop_pct"])


def manual_top1(model, root, size, indices, top5=False):
    """What timm's validate.py computes: its dataset, its eval transform at this size, top-1 (and top-5)."""
    transform = timm_transform(model, size)
    dataset = timm.data.ImageDataset(str(root))
    hits, hits5 = 0, 0
    model.eval()
    with torch.no_grad():
        for i in indices:
            image, target = dataset[i]
            logits = model(transform(image)[None])[0]
            hits += int(logits.argmax() == target)
            hits5 += int(target in logits.topk(min(5, logits.numel())).indices.tolist())
    return (100 * hits / len(indices), 100 * hits5 / len(indices)) if top5 else 100 * hits / len(indices)


@pytest.fixture(scope="module")
def folder7(tmp_path_factory):
    """7 classes x 5 images: top-5 is not every class, so it measures something."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("val7")
    rng = np.random.default_rng(1)
    for c in range(7):
        (root / f"c{c}").mkdir()
        for i in range(5):
            image = rng.integers(0, 255, (50, 56, 3), dtype=np.uint8)
            image[..., c % 3] = 40 * c
            Image.fromarray(image).save(root / f"c{c}" / f"{i}.png")
    return root


def test_calibrated_and_trained_figures_are_what_timm_computes_on_those_models(folder7):
    import copy

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=7)
    report = sct.evaluate(model, folder7, [64, 32], holdout=7, latency_repeats=0)
    order = torch.randperm(35, generator=torch.Generator().manual_seed(0)).tolist()
    held, scored = order[:7], sorted(order[7:])
    # the calibrated arm, rebuilt by hand: each branch's statistics from the 7 held-out images,
    # preprocessed by timm's own transform at that size
    calibrated = sct.convert(copy.deepcopy(model), [64, 32])
    dataset = timm.data.ImageDataset(str(folder7))
    for size in (64, 32):
        transform = timm_transform(model, size)
        batch = torch.stack([transform(dataset[i][0]) for i in held])
        sct.calibrate(calibrated, [batch], num_batches=1, scales=[size])
    rows = {(r.scale, r.arm): r for r in report.rows}
    for size in (64, 32):
        top1, top5 = manual_top1(calibrated, folder7, size, scored, top5=True)
        row = rows[(str(size), "calibrated")]
        assert (row.top1, row.top5) == (pytest.approx(top1, abs=0.01), pytest.approx(top5, abs=0.01)), size
    assert any(r.top5 < 100 for r in report.rows)  # 7 classes: top-5 can miss
    # an SCT model is scored with its own branches, on every image: the same figures again
    trained = sct.evaluate(calibrated, folder7, [64, 32], latency_repeats=0)
    for r in trained.rows:
        assert r.arm == "trained" and r.images == 35
        top1, top5 = manual_top1(calibrated, folder7, int(r.scale), range(35), top5=True)
        assert (r.top1, r.top5) == (pytest.approx(top1, abs=0.01), pytest.approx(top5, abs=0.01))


def test_cli_evaluate_applies_mean_std_crop_pct_and_calibrate_images(folder, tmp_path):
    model = timm.create_model("test_resnet", num_classes=3)
    safetensors.torch.save_file(model.state_dict(), str(tmp_path / "plain.safetensors"))
    out = tmp_path / "report.json"
    r = CliRunner().invoke(cli, ["evaluate", "test_resnet", "--checkpoint", str(tmp_path / "plain.safetensors"),
                                 "--num-classes", "3", "--images", str(folder), "--scales", "48",
                                 "--mean", "0.4,0.5,0.6", "--std", "0.2,0.25,0.3", "--crop-pct", "0.75",
                                 "--calibrate-images", str(folder), "--max-images", "20", "--latency-repeats", "0",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    written = json.loads(out.read_text())
    config = written["data_config"]
    assert [float(v) for v in config["mean"]] == [0.4, 0.5, 0.6] and [float(v) for v in config["std"]] == [0.2, 0.25, 0.3]
    assert float(config["crop_pct"]) == 0.75
    assert any(f"calibrated on 36 images of {folder}" in n for n in written["notes"])
    model.load_state_dict(safetensors.torch.load_file(tmp_path / "plain.safetensors"))
    want = sct.evaluate(model, folder, [48], calibrate_images=folder, max_images=20, latency_repeats=0,
                        data_config={"mean": (0.4, 0.5, 0.6), "std": (0.2, 0.25, 0.3), "crop_pct": 0.75})
    assert [(row["arm"], row["top1"], row["top5"]) for row in written["rows"]] == [
        (r.arm, r.top1, r.top5) for r in want.rows]
    default = sct.evaluate(model, folder, [48], calibrate_images=folder, max_images=20, latency_repeats=0)
    assert default.data_config["crop_pct"] != 0.75


def test_plain_and_calibrated_arms_at_every_scale(folder):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = sct.evaluate(model, folder, SCALES, holdout=6, latency_repeats=1)
    assert [(r.scale, r.arm) for r in report.rows] == [(str(s), a) for s in SCALES for a in ("plain", "calibrated")]
    assert all(r.images == 30 for r in report.rows)  # 36 images, 6 held out to calibrate
    assert any("6 images held out" in n and "disjoint" in n for n in report.notes)
    assert all(r.latency_ms > 0 and r.latency_ms_b32 > 0 for r in report.rows)
    assert all(0 <= r.top1 <= r.top5 == 100.0 for r in report.rows)  # 3 classes: top-5 holds them all
    # the plain arm is exactly timm's own evaluation of the scored images
    order = torch.randperm(36, generator=torch.Generator().manual_seed(0)).tolist()
    scored = sorted(order[6:])
    for r in report.rows:
        if r.arm == "plain":
            assert r.top1 == pytest.approx(manual_top1(model, folder, int(r.scale), scored), abs=0.01)
    # the user's model is untouched: the calibrated arm is a converted copy
    assert not hasattr(model, "_sct_context")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_calibrated_arm_uses_another_folder_when_given(folder, tmp_path):
    model = timm.create_model("test_resnet", num_classes=3)
    report = sct.evaluate(model, folder, [48], calibrate_images=folder, latency_repeats=0, max_images=20)
    assert [r.images for r in report.rows] == [20, 20]
    assert any(f"calibrated on 36 images of {folder}" in n for n in report.notes)
    assert report.rows[0].latency_ms is None
    for suffix in (".csv", ".md", ".json"):
        report.write(tmp_path / f"r{suffix}")
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert list(rows[0]) == ["scale", "arm", "top1", "top5", "images", "latency_ms", "latency_ms_b32", "relative_macs", "cascade_of"]
    assert json.loads((tmp_path / "r.json").read_text())["rows"][1]["arm"] == "calibrated"
    assert "| 48 | calibrated |" in (tmp_path / "r.md").read_text()
    with pytest.raises(ValueError, match=r"\.csv, \.md or \.json"):
        report.write(tmp_path / "r.txt")


def test_an_sct_model_is_scored_with_its_own_branches(folder):
    model = sct.convert(timm.create_model("test_resnet", num_classes=3), [64, 32])
    report = sct.evaluate(model, folder, [64, 48, 32], latency_repeats=0)
    assert {r.arm for r in report.rows} == {"trained"} and report.rows[0].images == 36


def test_a_grayscale_model_needs_its_own_mean_and_std(folder):
    model = timm.create_model("test_resnet", num_classes=3, in_chans=1)
    with pytest.raises(ValueError, match=r"takes 1 channel.*--mean / --std"):
        sct.evaluate(model, folder, [48], latency_repeats=0)
    report = sct.evaluate(model, folder, [48], latency_repeats=0, holdout=6,
                          data_config={"mean": (0.5,), "std": (0.25,)})
    assert len(report.rows) == 2


def test_cli_evaluate_writes_the_report_and_plot(folder, tmp_path):
    model = timm.create_model("test_resnet", num_classes=3)
    safetensors.torch.save_file(model.state_dict(), str(tmp_path / "plain.safetensors"))
    out, plot = tmp_path / "report.csv", tmp_path / "curve.png"
    r = CliRunner().invoke(cli, ["evaluate", "test_resnet", "--checkpoint", str(tmp_path / "plain.safetensors"),
                                 "--num-classes", "3", "--images", str(folder), "--scales", "64,32", "--holdout", "6",
                                 "--out", str(out), "--plot", str(plot), "--latency-repeats", "1"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(out)))
    assert [(row["scale"], row["arm"]) for row in rows] == [("64", "plain"), ("64", "calibrated"),
                                                           ("32", "plain"), ("32", "calibrated")]
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert "evaluate: 2/2" in r.output  # one progress line per scale when not on a terminal
    bad = CliRunner().invoke(cli, ["evaluate", "test_resnet", "--images", str(folder), "--out", str(tmp_path / "r.txt")])
    assert bad.exit_code != 0 and len(bad.output.strip().splitlines()) == 1 and ".csv, .md or .json" in bad.output
    bad = CliRunner().invoke(cli, ["evaluate", "test_resnet", "--images", str(tmp_path / "none"), "--out", str(out)])
    assert bad.exit_code != 0 and "--images" in bad.output and "does not exist" in bad.output


def test_sizes_without_a_branch_say_what_served_them(folder):
    model = sct.convert(timm.create_model("test_resnet", num_classes=3), [64, 32])
    report = sct.evaluate(model, folder, [48], latency_repeats=0)
    assert any("48 has no branch of its own: served by 32 (unknown_scale='nearest')" in n for n in report.notes)


def test_a_folder_whose_classes_cannot_be_the_models_is_warned_about_and_noted(folder):
    model = timm.create_model("test_resnet", num_classes=5)  # 3 folders, 5 classes
    with pytest.warns(UserWarning, match="holds 3 class folders but the model predicts 5 classes"):
        report = sct.evaluate(model, folder, [32], holdout=6, latency_repeats=0)
    assert any("class_map" in n for n in report.notes)
    with warnings.catch_warnings(record=True) as caught:  # a matching model: no such warning
        warnings.simplefilter("always")
        sct.evaluate(timm.create_model("test_resnet", num_classes=3), folder, [32], holdout=6, latency_repeats=0)
    assert not [w for w in caught if "class folders" in str(w.message)]


class FakeClock:
    """A clock that moves only when a model runs: timing tests that cannot fail on a loaded CI box."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Takes(torch.nn.Module):
    """A model whose forward takes ``seconds`` on the fake clock, one call after another."""

    def __init__(self, clock, name, seconds):
        super().__init__()
        self.clock, self.name, self.seconds, self.calls = clock, name, seconds, calls_log

    def forward(self, x):
        self.calls.append(self.name)
        self.clock.now += self.seconds.pop(0) if isinstance(self.seconds, list) else self.seconds
        return x


calls_log = []


def test_latency_is_the_median_of_warm_runs_within_a_time_budget():
    from sct_convert.evaluation.run import latency_ms

    calls_log.clear()
    clock = FakeClock()
    # two warm-ups (slow: building kernels), then 0.05 s a run with one outlier
    model = Takes(clock, "m", [1.0, 1.0, 0.05, 0.05, 0.30, 0.05, 0.05, 0.05, 0.05])
    ms = latency_ms(model, (1, 3, 8, 8), repeats=100, device=torch.device("cpu"), budget_s=0.44, clock=clock)
    # runs until 0.44 s of timed runs are spent: 0.05 + 0.05 + 0.30 + 0.05 = 0.45, then stops
    assert len(calls_log) == 2 + 4
    assert ms == pytest.approx(50.0)  # the median: neither the warm-ups nor the outlier


def test_arms_are_timed_in_turns_so_load_hits_them_alike():
    from sct_convert.evaluation.run import paired_latency_ms

    calls_log.clear()
    clock = FakeClock()
    ms = paired_latency_ms({"a": Takes(clock, "a", 0.02), "b": Takes(clock, "b", 0.04)}, (2, 3, 8, 8), repeats=4,
                           device=torch.device("cpu"), clock=clock)
    assert calls_log == ["a", "b"] * 2 + ["a", "b", "b", "a"] * 2  # warm-ups, then rounds in alternating order
    assert ms == {"a": pytest.approx(10.0), "b": pytest.approx(20.0)}  # per image: batch of 2

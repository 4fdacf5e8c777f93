"""A second runtime: the switchable ONNX file in OpenVINO gives onnxruntime's answer at every
size, and the OpenVINO defect its routing avoids stays visible (optional extra: [openvino])."""
import numpy as np
import onnx
import pytest
import timm
import torch

import sct_convert as sct

ov = pytest.importorskip("openvino")


def openvino_cpu(path):
    # f32 for parity: the CPU plugin's default precision on bf16-capable CPUs differs by ~1e-3
    return ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def test_openvino_still_computes_int64_abs_of_a_negative_value_wrongly(tmp_path):
    """Shape -> Mul -> Sub -> Abs on an 8x8 input: onnxruntime gives [960, 0], OpenVINO 2026.4's
    CPU plugin [-960, 0]. The switchable file's routing squares the gap instead of Abs for this
    reason; the day this test fails, OpenVINO fixed it (and the docs can say so)."""
    import onnxruntime as ort

    helper = onnx.helper
    ints = lambda name, v: onnx.numpy_helper.from_array(np.asarray(v, dtype=np.int64), name)  # noqa: E731
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Gather", ["shape", "h_axis"], ["h"], axis=0),
             helper.make_node("Gather", ["shape", "w_axis"], ["w"], axis=0),
             helper.make_node("Mul", ["h", "w"], ["hw"]), helper.make_node("Sub", ["hw", "pixels"], ["diff"]),
             helper.make_node("Abs", ["diff"], ["gap"])]
    graph = helper.make_graph(nodes, "abs", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, "h", "w"])],
                              [helper.make_tensor_value_info("gap", onnx.TensorProto.INT64, [2])],
                              [ints("pixels", [1024, 64]), ints("h_axis", [2]), ints("w_axis", [3])])
    path = tmp_path / "abs.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    x = np.zeros((1, 3, 8, 8), np.float32)
    assert ort.InferenceSession(str(path)).run(None, {"x": x})[0].tolist() == [960, 0]
    compiled = openvino_cpu(path)
    assert compiled({"x": x})[compiled.output(0)].tolist() == [-960, 0]


def test_openvino_still_computes_int64_in_int32_so_a_squared_pixel_gap_overflows(tmp_path):
    """The same graph with ``diff * diff`` (the routing's previous form) at 256 px against a scale
    of 128 px: 49,152 squared is 2,415,919,104 in onnxruntime and wraps to -1,879,048,192 in
    OpenVINO 2026.4's CPU plugin, which computes int64 as int32. ``Max(diff, -diff)``, the form
    the routing uses, is right in both. The day the first assertion fails, OpenVINO fixed it."""
    import onnxruntime as ort

    from sct_convert.core.rule import absolute_nodes

    helper = onnx.helper
    ints = lambda name, v: onnx.numpy_helper.from_array(np.asarray(v, dtype=np.int64), name)  # noqa: E731
    head = [helper.make_node("Shape", ["x"], ["shape"]),
            helper.make_node("Gather", ["shape", "h_axis"], ["h"], axis=0),
            helper.make_node("Gather", ["shape", "w_axis"], ["w"], axis=0),
            helper.make_node("Mul", ["h", "w"], ["hw"]), helper.make_node("Sub", ["hw", "pixels"], ["diff"])]
    x = np.zeros((1, 1, 256, 256), np.float32)
    answers = {}
    for form, tail in (("square", [helper.make_node("Mul", ["diff", "diff"], ["gap"])]),
                       ("max", absolute_nodes("diff", "gap"))):
        graph = helper.make_graph(head + tail, form, [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, "h", "w"])],
                                  [helper.make_tensor_value_info("gap", onnx.TensorProto.INT64, [2])],
                                  [ints("pixels", [128 * 128, 256 * 256]), ints("h_axis", [2]), ints("w_axis", [3])])
        path = tmp_path / f"{form}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
        compiled = openvino_cpu(path)
        answers[form] = (ort.InferenceSession(str(path)).run(None, {"x": x})[0].tolist(),
                         compiled({"x": x})[compiled.output(0)].tolist())
    assert answers["square"] == ([2415919104, 0], [-1879048192, 0])
    assert answers["max"] == ([49152, 0], [49152, 0])


def test_the_switchable_file_gives_onnxruntimes_answer_in_openvino_at_every_size(tmp_path):
    from sct_convert.runtime import open_session

    torch.manual_seed(0)
    # sizes whose last feature map is wider than one pixel: OpenVINO refuses a pooling kernel
    # larger than its input, which a branch traced at a tiny size carries (as the plain model does)
    # 256 against 128: a pixel-count gap of 49,152, whose square overflows the int32 that the
    # CPU plugin computes int64 in (the squared gap routed 256 px to 128's branch and back)
    model = sct.convert(timm.create_model("test_resnet", num_classes=10), [256, 192, 128]).eval()
    with torch.no_grad():  # branches that differ, so a wrong branch is a wrong answer
        for _, layer in sct.scale_specific_layers(model):
            layer.branches["192"].running_mean.add_(0.5)
            layer.branches["128"].running_mean.sub_(0.5)
    path = sct.export_onnx(model, tmp_path / "m.onnx")
    session, compiled = open_session(path), openvino_cpu(path)
    # sizes nearer the largest scale are the ones Abs got wrong; 256 and 128 the ones d * d did
    for side in (256, 240, 224, 192, 160, 128):
        x = torch.randn(2, 3, side, side).numpy()
        want = session.run(None, {"images": x})[0]
        got = compiled({"images": x})[compiled.output(0)]
        assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max()), side


@pytest.mark.parametrize("family", ["segmentation", "video"])
def test_segmentation_and_video_switchable_files_run_alike_in_openvino(tmp_path, family):
    from _util import Clip, TinySegNet, perturb_branches

    from sct_convert.runtime import open_session

    torch.manual_seed(0)
    net, scales, lead = (TinySegNet(), [64, 32], (2, 3)) if family == "segmentation" else (Clip(), [32, 16], (2, 3, 4))
    model = sct.convert(net, scales).eval()
    perturb_branches(model)  # a wrong branch would show
    path = sct.export_onnx(model, tmp_path / "m.onnx")
    session, compiled = open_session(path), openvino_cpu(path)
    for side in (*scales, (scales[0] + scales[1]) // 2):
        x = torch.randn(*lead, side, side).numpy()
        want = session.run(None, {"images": x})[0]
        got = compiled({"images": x})[compiled.output(0)]
        assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max()), side


def test_the_switchable_int8_file_runs_in_openvino_and_the_export_says_it_was_checked(tmp_path):
    from sct_convert.deploy.int8 import branch_precision
    from sct_convert.runtime import open_session

    torch.manual_seed(0)
    model = sct.convert(timm.create_model("test_resnet", num_classes=10), [96, 64])
    images = torch.rand(32, 3, 96, 96)
    sct.calibrate(model, [images])  # real activation statistics: outputs that vary with the input
    path = sct.export_onnx(model.eval(), tmp_path / "m8.onnx", int8=images)
    proto = onnx.load(str(path))
    assert branch_precision(proto) == {"96": "int8", "64": "int8"}
    checked = {p.key: p.value for p in proto.metadata_props}["sct_convert.checked_in"]
    assert checked.startswith("onnxruntime ") and f"openvino {ov.get_version().split('-')[0]}" in checked
    session, compiled = open_session(path), openvino_cpu(path)
    for side in (96, 64):
        x = sct.resize_to(torch.rand(64, 3, 96, 96), (side, side))  # drawn as the calibration images were
        with torch.no_grad():
            exact = sct.extract(model, side)(x).numpy()
        ort_int8 = session.run(None, {"images": x.numpy()})[0]
        ov_int8 = compiled({"images": x.numpy()})[compiled.output(0)]
        # the two runtimes' int8 kernels round differently: OpenVINO's answer is as near the float
        # model's as onnxruntime's, and mostly picks the same class
        assert np.abs(ov_int8 - exact).max() <= 1.5 * np.abs(ort_int8 - exact).max() + 0.05, side
        assert (ov_int8.argmax(1) == ort_int8.argmax(1)).mean() >= 0.6, side


def test_a_file_openvino_cannot_run_is_written_with_one_line_naming_what_works(tmp_path):
    """resnet10t at 16 px ends in a 1-pixel map that OpenVINO's AveragePool shape check refuses
    (the plain model exported at 16 px is refused the same way); onnxruntime runs it."""
    torch.manual_seed(0)
    model = sct.convert(timm.create_model("resnet10t", num_classes=3), [32, 16]).eval()
    with pytest.warns(UserWarning) as caught:
        path = sct.export_onnx(model, tmp_path / "m.onnx")
    lines = [str(w.message) for w in caught if "OpenVINO" in str(w.message)]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "cannot run it at scale 16" in lines[0] and "matches onnxruntime at scale 32" in lines[0]
    assert path.exists()
    checked = {p.key: p.value for p in onnx.load(str(path)).metadata_props}["sct_convert.checked_in"]
    assert "openvino" not in checked

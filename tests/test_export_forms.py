"""What the ONNX file holds for each formulation, and that every one passes the export's
numeric check (1e-5 relative against eager PyTorch at two input sizes): SPD as ONNX's
SpaceToDepth where the channel order matches, each BlurPool export form, the folded blur +
pointwise conv, and `export(..., fold_layers=True)` choosing forms in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from surgeon.export import export
from surgeon.layers import BlurPool, FoldedBlurConv, SpaceToDepthConv

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

TOLERANCE = 1e-5
EXAMPLE = torch.randn(1, 8, 16, 16, generator=torch.Generator().manual_seed(0))


def _export(model: nn.Module, path: Path, **kwargs: Any) -> Any:
    """Export to ONNX with the 1e-5 check; the loaded ONNX graph."""
    result = export(
        model.eval(), "onnx", path, example_input=EXAMPLE, tolerance=TOLERANCE, **kwargs
    )
    assert [c.input_shape for c in result.checks] == [(1, 8, 16, 16), (2, 8, 13, 13)]
    assert max(c.rel_diff for c in result.checks) <= TOLERANCE, result.checks
    return onnx.load(str(path)).graph, result


def _ops(graph: Any) -> list[str]:
    """Op types of the graph's nodes, those inside If branches included."""
    ops = []
    for node in graph.node:
        ops.append(node.op_type)
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                ops += _ops(attribute.g)
    return ops


def _attribute(node: Any, name: str) -> Any:
    return onnx.helper.get_attribute_value(next(a for a in node.attribute if a.name == name))


def _dense_spd(conv: nn.Conv2d) -> SpaceToDepthConv:
    layer, _ = SpaceToDepthConv.from_conv(conv)
    with torch.no_grad():
        layer.conv.weight.add_(0.05 * torch.randn_like(layer.conv.weight))
    return layer


def test_phase_major_spd_is_written_as_onnx_space_to_depth(tmp_path: Path) -> None:
    torch.manual_seed(0)
    layer = _dense_spd(nn.Conv2d(8, 16, 3, 2, 1))
    assert layer.phase_major
    graph, _ = _export(layer, tmp_path / "spd.onnx")
    (node,) = [n for n in graph.node if n.op_type == "SpaceToDepth"]
    assert _attribute(node, "blocksize") == 2


def test_channel_major_spd_keeps_the_reshape_copy(tmp_path: Path) -> None:
    # grouped convolutions need each channel's phases together: not ONNX's order
    torch.manual_seed(0)
    layer = _dense_spd(nn.Conv2d(8, 8, 3, 2, 1, groups=4))
    assert not layer.phase_major
    graph, _ = _export(layer, tmp_path / "grouped.onnx")
    assert "SpaceToDepth" not in _ops(graph)


@pytest.mark.parametrize(
    ("conv", "kernel_size", "pads"),
    [
        (nn.Conv2d(8, 16, 3, 2, 1), None, [1, 1, 2, 2]),  # dense SPD b2 + k2: a 4x4 conv
        (nn.Conv2d(8, 16, 3, 2, 1), 3, [1, 1, 4, 4]),  # the spd policy's k3: 6x6
        (nn.Conv2d(8, 8, 1, 2, groups=2), None, [0, 0, 1, 1]),  # a grouped shortcut
    ],
)
def test_folded_spd_is_one_convolution_with_its_own_padding(
    conv: nn.Conv2d, kernel_size: int | None, pads: list[int], tmp_path: Path
) -> None:
    from surgeon.fold import fold_space_to_depth

    torch.manual_seed(0)
    layer, _ = SpaceToDepthConv.from_conv(conv, kernel_size=kernel_size)
    with torch.no_grad():
        layer.conv.weight.add_(0.05 * torch.randn_like(layer.conv.weight))
    graph, _ = _export(fold_space_to_depth(layer), tmp_path / "folded.onnx")
    (node,) = graph.node  # the padding is the same at every size: the convolution's own
    assert node.op_type == "Conv" and list(_attribute(node, "pads")) == pads


def test_reflect_blur_pad_form_keeps_the_reflect_or_replicate_choice_in_the_graph(
    tmp_path: Path,
) -> None:
    graph, _ = _export(BlurPool(8, export_form="pad"), tmp_path / "pad.onnx")
    (branch,) = [
        n
        for n in graph.node
        if n.op_type == "If" and any(p.op_type == "Pad" for g in _branch_graphs(n) for p in g.node)
    ]
    modes = sorted(
        _attribute(pad, "mode").decode()
        for g in _branch_graphs(branch)
        for pad in g.node
        if pad.op_type == "Pad"
    )
    assert modes == ["edge", "reflect"]
    assert "Gather" not in [n.op_type for n in graph.node if n.input and n.input[0] == "input"]
    _runs_on_tiny_maps(tmp_path / "pad.onnx", BlurPool(8))


def test_several_blurs_with_branches_in_one_file_keep_their_own_sizes(tmp_path: Path) -> None:
    # every If comes from one scripted function: the file must not give their outputs one
    # shared symbolic size, or ONNX Runtime holds different layers to it
    torch.manual_seed(0)
    model = nn.Sequential(
        BlurPool(8, export_form="pad"),
        nn.Conv2d(8, 12, 1),
        BlurPool(12, export_form="separable"),
        nn.Conv2d(12, 12, 1),
        BlurPool(12, filter_size=3, export_form="pad"),
    )
    graph, _ = _export(model, tmp_path / "three.onnx")
    branches = [g for n in graph.node if n.op_type == "If" for g in _branch_graphs(n)]
    assert len(branches) == 6
    claimed = [o.name for g in branches for o in g.output if o.type.tensor_type.HasField("shape")]
    assert not claimed, f"If branch outputs with recorded shapes: {claimed}"
    import onnxruntime

    session = onnxruntime.InferenceSession(
        str(tmp_path / "three.onnx"), providers=["CPUExecutionProvider"]
    )
    for shape in [(3, 8, 40, 36), (1, 8, 5, 7)]:
        x = torch.randn(shape)
        (got,) = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            assert torch.allclose(torch.from_numpy(got), model(x), atol=1e-6), shape


def _branch_graphs(node: Any) -> list[Any]:
    return [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]


def _runs_on_tiny_maps(path: Path, reference: nn.Module) -> None:
    """Maps too short to reflect fall back to replicate in the file too."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, 8, 2, 3), (2, 8, 1, 1), (1, 8, 3, 2)]:
        x = torch.randn(shape)
        (got,) = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            want = reference(x)
        assert torch.allclose(torch.from_numpy(got), want, atol=1e-6), shape


def test_separable_blur_form_is_two_one_dimensional_depthwise_convolutions(
    tmp_path: Path,
) -> None:
    graph, _ = _export(BlurPool(8, export_form="separable"), tmp_path / "separable.onnx")
    convs = [n for n in graph.node if n.op_type == "Conv"]
    shapes = [tuple(_attribute(c, "kernel_shape")) for c in convs]
    assert shapes == [(4, 1), (1, 4)] and all(_attribute(c, "group") == 8 for c in convs)
    _runs_on_tiny_maps(tmp_path / "separable.onnx", BlurPool(8))


def test_zero_padded_blur_conv_form_is_one_convolution_with_its_own_padding(
    tmp_path: Path,
) -> None:
    graph, _ = _export(BlurPool(8, pad_mode="zero", export_form="conv"), tmp_path / "conv.onnx")
    (conv,) = [n for n in graph.node if n.op_type != "Constant"]
    assert conv.op_type == "Conv" and list(_attribute(conv, "pads")) == [1, 1, 2, 2]


@pytest.mark.parametrize("pad_mode", ["zero", "reflect"])
def test_folded_blur_and_pointwise_conv_is_one_strided_convolution(
    pad_mode: str, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    folded = FoldedBlurConv.from_pair(BlurPool(8, pad_mode=pad_mode), nn.Conv2d(8, 12, 1))
    graph, _ = _export(folded, tmp_path / f"{pad_mode}.onnx")
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert [tuple(_attribute(c, "kernel_shape")) for c in convs] == [(4, 4)]
    assert tuple(_attribute(convs[0], "strides")) == (2, 2)
    if pad_mode == "zero":
        assert [op for op in _ops(graph) if op != "Constant"] == ["Conv"], "padding is the conv's"


def test_onnx_export_with_fold_chooses_forms_in_onnxruntime(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        _dense_spd(nn.Conv2d(8, 16, 3, 2, 1)),
        nn.ReLU(),
        BlurPool(16),
        nn.Sequential(BlurPool(16), nn.Conv2d(16, 8, 1)),
    )
    graph, result = _export(model, tmp_path / "folded.onnx", fold_layers=True)
    record = result.fold
    assert record is not None and record.backend == "onnxruntime"
    assert {layer.name for layer in record.layers} == {"0", "2", "3.0", "3"}
    assert all(layer.timings for layer in record.layers), "every unit timed in ONNX Runtime"
    spd = next(layer for layer in record.layers if layer.name == "0")
    assert _ops(graph).count("SpaceToDepth") == (spd.form == "kept")
    # the file holds the forms the record names: no index gathers of the data where every
    # blur left the gather form
    blurs = [layer for layer in record.layers if layer.kind == "blur"]
    if all(layer.form != "kept" for layer in blurs):
        assert "Where" not in _ops(graph)


def test_an_interior_fold_is_checked_against_the_folded_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(BlurPool(8), nn.Conv2d(8, 8, 1)))
    _, result = _export(model, tmp_path / "interior.onnx", fold_layers="folded", interior_only=True)
    record = result.fold
    assert record is not None and record.forms == {"0.0": "kept", "0": "interior"}
    assert record.layers[1].rel_diff > TOLERANCE, "its borders differ from the pair's"


@pytest.mark.parametrize("format", ["torchscript", "onnx", "exported-program"])
def test_every_form_exports_in_every_format_within_1e5(format: str, tmp_path: Path) -> None:
    from surgeon.fold import fold_space_to_depth

    torch.manual_seed(0)
    model = nn.Sequential(
        fold_space_to_depth(_dense_spd(nn.Conv2d(8, 16, 3, 2, 1))),
        BlurPool(16, export_form="pad"),
        nn.Sequential(BlurPool(16, export_form="separable"), nn.Conv2d(16, 4, 1)),
        FoldedBlurConv.from_pair(BlurPool(4, pad_mode="zero"), nn.Conv2d(4, 4, 1)),
        BlurPool(4, pad_mode="zero", export_form="conv"),
    ).eval()
    suffix = {"torchscript": "pt", "onnx": "onnx", "exported-program": "pt2"}[format]
    x = torch.randn(1, 8, 64, 64)
    result = export(model, format, tmp_path / f"m.{suffix}", example_input=x, tolerance=TOLERANCE)
    assert [c.input_shape for c in result.checks] == [(1, 8, 64, 64), (2, 8, 49, 49)]

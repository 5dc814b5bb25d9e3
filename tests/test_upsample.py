"""Upsampling sites (arithmetic checked against the forward pass), receptive fields and jumps,
the `upsample` rewrite, and policies that compose several actions."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from surgeon.patch import patch
from surgeon.policy_loader import parse_policy
from surgeon.report import patch_markdown, render_patch
from surgeon.rewrites import action_schemas
from surgeon.rewrites.upsample import ResizeConv, SubPixelConv
from surgeon.scan import scan
from surgeon.sites import expected_output_shape
from tests.conftest import rendered


class _Decoder(nn.Module):
    """Every kind of upsampling: transposed convs (with output_padding, dilation, groups),
    nn.Upsample by 2 and by 1.5, F.interpolate to a size, pixel shuffle."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, 2, 1)
        self.t4 = nn.ConvTranspose2d(8, 8, 4, 2, 1)
        self.t3 = nn.ConvTranspose2d(8, 6, 3, 2, 1, output_padding=1)
        self.t5 = nn.ConvTranspose2d(8, 4, 5, 3, 2, output_padding=2, groups=2, dilation=2)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear")
        self.up15 = nn.Upsample(scale_factor=1.5)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = self.down(x)
        return (
            self.t4(y),
            self.t3(y),
            self.t5(y),
            self.up(y),
            self.up15(y),
            F.interpolate(y, size=x.shape[-2:]),
            self.shuffle(y),
        )


@pytest.mark.parametrize("size", [7, 9, 13])
def test_upsampling_sites_are_listed_and_their_arithmetic_equals_the_forward_pass(
    size: int,
) -> None:
    result = scan(_Decoder(), torch.randn(1, 3, size, size + 2))
    ups = [s for s in result.sites if s.role == "upsample"]
    assert [(s.name, s.op) for s in ups] == [
        ("t4", "conv_transpose"),
        ("t3", "conv_transpose"),
        ("t5", "conv_transpose"),
        ("up", "interpolate"),
        ("up15", "interpolate"),
        (":interpolate", "interpolate"),
        ("shuffle", "pixel_shuffle"),
    ]
    for site in result.sites:
        assert expected_output_shape(site) == site.out_shape, site.name
    by_name = {s.name: s for s in ups}
    assert by_name["t3"].output_padding == (1, 1) and by_name["t5"].groups == 2
    assert by_name["up15"].scale == (1.5, 1.5) and by_name["shuffle"].out_channels == 2
    assert all(s.stage_in == 2 and s.stage_out == 1 for s in ups)


def test_receptive_field_and_jump_follow_the_graph() -> None:
    result = scan(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
    fields = {s.name: (s.receptive_field[0], s.jump[0]) for s in result.sites}
    # r_out = r_in + (k-1)·d·j_in, j_out = j_in·s: conv1 7×7/2, maxpool 3×3/2,
    # then layer1 (4 convs 3×3 at jump 4): 11 + 4·2·4 = 43, and layer2.0.conv1 3×3/2 at jump 4
    assert fields["conv1"] == (7.0, 2.0)
    assert fields["maxpool"] == (11.0, 4.0)
    assert fields["layer2.0.conv1"] == (43.0 + 2 * 4, 8.0)
    assert fields["layer2.0.downsample.0"] == (43.0, 8.0)
    # an upsampler divides the jump: a transposed conv is a conv on the zero-inserted input
    decoder = {s.name: s for s in scan(_Decoder(), torch.randn(1, 3, 16, 16)).sites}
    assert decoder["down"].jump == (2.0, 2.0) and decoder["down"].receptive_field == (3.0, 3.0)
    assert decoder["t4"].jump == (1.0, 1.0) and decoder["t4"].receptive_field == (6.0, 6.0)
    assert decoder["up"].receptive_field == (5.0, 5.0)  # bilinear mixes two input samples


_CASES = [
    # (dims, kernel, stride, padding, output_padding, dilation, groups)
    (2, 4, 2, 1, 0, 1, 1),
    (2, 3, 2, 1, 1, 1, 1),
    (2, 5, 3, 2, 2, 1, 2),
    (2, 3, 2, 0, 1, 2, 1),
    (2, 2, 2, 0, 0, 1, 1),
    (1, 7, 4, 3, 1, 1, 1),
    (3, 4, 2, 1, 1, 1, 1),
]


@pytest.mark.parametrize("size", [5, 6])
@pytest.mark.parametrize(("dims", "k", "s", "p", "op", "d", "g"), _CASES)
def test_pixel_shuffle_transfer_reproduces_a_transposed_conv_exactly(
    dims: int, k: int, s: int, p: int, op: int, d: int, g: int, size: int
) -> None:
    transposed = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
    layer = transposed(4, 6, k, s, p, output_padding=op, groups=g, dilation=d)
    x = torch.randn(2, 4, *([size] * dims))
    new = SubPixelConv(
        4, 6, (k,) * dims, (s,) * dims, (p,) * dims, (d,) * dims, (op,) * dims, groups=g
    )
    new.transfer(layer.weight.detach(), layer.bias.detach())
    with torch.no_grad():
        want, got = layer(x), new(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # output_size= picks another output_padding, as ConvTranspose does
    target = [(size - 1) * s - 2 * p + d * (k - 1) + 1 + (s - 1 - op)] * dims
    with torch.no_grad():
        torch.testing.assert_close(new(x, target), layer(x, target), atol=1e-5, rtol=1e-5)


def test_stride_2_kernel_4_transposed_conv_is_a_3x3_conv_and_pixel_shuffle() -> None:
    new = SubPixelConv(8, 8, (4, 4), (2, 2), (1, 1), (1, 1), (0, 0))
    assert new.conv.kernel_size == (3, 3) and new.left == (1, 1) and new.conv.out_channels == 32


def _decoder_policy(mode: str) -> object:
    text = f"""
name: up
description: ''
rules:
  - match: {{role: upsample, op: conv_transpose}}
    action: upsample
    params: {{mode: {mode}}}
"""
    return parse_policy(text, "up.yaml", action_schemas())


@pytest.mark.parametrize(
    ("mode", "transfer"), [("pixel-shuffle", "exact"), ("resize-conv", "approximate")]
)
def test_upsample_rewrite_keeps_every_output_shape(mode: str, transfer: str) -> None:
    model = _Decoder().eval()
    original = copy.deepcopy(model)
    x = torch.randn(1, 3, 11, 13)
    patched, report = patch(model, _decoder_policy(mode), x)
    rows = {r.site: r for r in report.rows if r.status == "patched"}
    assert set(rows) == {"t4", "t3", "t5"}
    assert {r.transfer for r in rows.values()} == {transfer}
    layer = SubPixelConv if mode == "pixel-shuffle" else ResizeConv
    assert all(isinstance(getattr(patched, n), layer) for n in rows)
    with torch.no_grad():
        for want, got in zip(original(x), patched(x), strict=True):
            assert got.shape == want.shape
    if mode == "pixel-shuffle":
        assert max(r.rel_diff or 0 for r in rows.values()) < 1e-5
        assert report.output_rel_diff < 1e-5


def test_upsample_skips_interpolation_and_pixel_shuffle_with_a_reason() -> None:
    text = "name: u\ndescription: ''\nrules:\n  - match: {role: upsample}\n    action: upsample\n"
    _, report = patch(
        _Decoder().eval(), parse_policy(text, "u.yaml", action_schemas()), torch.randn(1, 3, 8, 8)
    )
    notes = {r.site: r.note for r in report.rows if r.status == "skipped"}
    assert notes["up"] == "upsample replaces transposed convolutions; this site is interpolate"
    assert (
        notes["shuffle"] == "upsample replaces transposed convolutions; this site is pixel shuffle"
    )


class _EncoderDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.pool = nn.MaxPool2d(2)
        self.mid = nn.Conv2d(8, 8, 3, 1, 1)
        self.down = nn.Conv2d(8, 8, 3, 2, 1)
        self.avg = nn.AvgPool2d(2)
        self.up1 = nn.ConvTranspose2d(8, 8, 4, 2, 1)
        self.up2 = nn.ConvTranspose2d(8, 3, 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mid(self.pool(self.stem(x)))
        return self.up2(self.up1(self.avg(self.down(y))))


def test_one_policy_composes_several_actions_and_the_report_shows_every_row(
    console: object,
) -> None:
    text = """
name: composed
description: every new action in one policy
rules:
  - name: move-stride
    match: {name: down}
    action: relocate
    params: {to: mid}
  - name: pools
    match: {op: max_pool}
    action: allconv
  - name: avg-spd
    match: {op: avg_pool}
    action: spd
  - name: decoder
    match: {role: upsample}
    action: upsample
    params: {mode: pixel-shuffle}
"""
    model = _EncoderDecoder().eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        shape = model(x).shape
    patched, report = patch(model, parse_policy(text, "composed.yaml", action_schemas()), x)
    status = {r.site: (r.status, r.action, r.transfer) for r in report.rows}
    assert status == {
        "stem": ("unmatched", None, None),
        "pool": ("patched", "allconv", "approximate"),
        "down": ("patched", "relocate", "kept"),
        "avg": ("patched", "spd", "exact"),
        "up1": ("patched", "upsample", "exact"),
        "up2": ("patched", "upsample", "exact"),
    }
    assert patched.mid.stride == (2, 2) and patched.down.stride == (1, 1)
    with torch.no_grad():
        assert patched(x).shape == shape == (1, 3, 16, 16)
    render_patch(report, console)  # type: ignore[arg-type]
    text_out = rendered(console)  # type: ignore[arg-type]
    for cell in (
        "depthwise conv k2 s2",
        "stride 2→1; mid takes it",
        "pixel shuffle ×2",
        "pixel shuffle ×4",
    ):
        assert cell in text_out, cell
    assert (
        "| up1 | ConvTranspose2d | upsample | conv k3 → 32 ch + pixel shuffle ×2 |"
        in patch_markdown(report)
    )

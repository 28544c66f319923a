"""The one conv-norm-act: the same numbers as conv -> norm -> ReLU written out, mmcv's checkpoint names, clear errors."""

import pytest
import torch
import torch.nn.functional as F

from fastseg.layers.blocks import ChannelLayerNorm, ConvNormAct


@pytest.mark.parametrize("norm", ["gn", "bn"])
def test_conv_norm_act_matches_the_plain_computation(norm):
    block = ConvNormAct(6, 16, 3, dilation=2, norm=norm).eval()
    x = torch.randn(2, 6, 9, 11)
    y = F.conv2d(x, block.conv.weight, None, padding=2, dilation=2)
    if norm == "gn":
        y = F.group_norm(y, 8, block.gn.weight, block.gn.bias, block.gn.eps)
    else:
        bn = block.bn
        y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    torch.testing.assert_close(block(x), F.relu(y))
    assert block(x).shape == (2, 16, 9, 11)
    assert sorted(k.split(".")[0] for k in block.state_dict()) == (
        ["conv", "gn", "gn"] if norm == "gn" else ["bn"] * 5 + ["conv"]
    )


def test_conv_norm_act_group_fallback_and_bad_norm():
    assert ConvNormAct(4, 12, 1).gn.num_groups == 1  # 12 channels do not split into 8 groups
    with pytest.raises(ValueError, match="norm must be one of"):
        ConvNormAct(4, 8, norm="ln")


def test_channel_layer_norm_normalises_each_pixel_over_channels():
    x = torch.randn(2, 5, 3, 4)
    norm = ChannelLayerNorm(5)
    expected = F.layer_norm(x.permute(0, 2, 3, 1), (5,), norm.weight, norm.bias, norm.eps).permute(0, 3, 1, 2)
    torch.testing.assert_close(norm(x), expected)

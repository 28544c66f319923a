"""`recompute_bn_statistics`: BatchNorm statistics re-estimated on given images, dropout off, nothing lost on failure."""

import pytest
import torch
from torch import nn

from fastseg.engine import recompute_bn_statistics


def _net() -> nn.Sequential:
    # Dropout before the BatchNorm: if it ran in train mode, the statistics would depend on its random mask.
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.Dropout(0.5), nn.BatchNorm2d(4), nn.ReLU())


def test_statistics_are_the_average_over_the_given_batches():
    torch.manual_seed(0)
    net = _net()
    net.train()
    for _ in range(5):  # polluted statistics: inputs far from the ones they are re-estimated on
        net(torch.randn(8, 3, 6, 6) * 5 + 3)
    batches = [torch.randn(4, 3, 6, 6) for _ in range(3)]
    assert recompute_bn_statistics(net, batches) == 12
    features = [net[0](b) for b in batches]  # eval mode: the dropout is the identity
    bn = net[2]
    expected_mean = torch.stack([f.mean((0, 2, 3)) for f in features]).mean(0)
    expected_var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in features]).mean(0)
    torch.testing.assert_close(bn.running_mean, expected_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, expected_var, rtol=1e-5, atol=1e-6)
    assert bn.momentum == 0.1 and not net.training and not bn.training  # momentum restored, model in eval mode


def test_an_empty_or_failing_stream_restores_the_old_statistics():
    torch.manual_seed(0)
    net = _net()
    net.train()
    net(torch.randn(8, 3, 6, 6) * 5 + 3)
    before = {k: v.clone() for k, v in net[2].state_dict().items()}
    with pytest.raises(ValueError, match="no images"):
        recompute_bn_statistics(net, [])

    def broken():
        yield torch.randn(4, 3, 6, 6)
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        recompute_bn_statistics(net, broken())
    for key, value in net[2].state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert net[2].momentum == 0.1


def test_a_model_without_batchnorm_is_refused():
    with pytest.raises(ValueError, match="no BatchNorm"):
        recompute_bn_statistics(nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4)), [torch.randn(2, 3, 4, 4)])

import torch

import gaugenet
from gaugenet.nets import LinearNetwork


def test_gauge_error_is_value_error():
    assert issubclass(gaugenet.GaugeError, ValueError)
    assert issubclass(gaugenet.NotLiftableError, gaugenet.GaugeError)


def test_linear_network_closed_form_matches_forward(gen):
    net = LinearNetwork.random(5, 6, generator=gen)
    x = torch.randn(7, 5, dtype=torch.float64, generator=gen)
    assert gaugenet.invariance_error(net, net, x) == 0.0
    err = (net(x) - net.closed_form(x)).abs().max() / net(x).abs().max()
    assert err < 1e-13

"""`gaugenet inspect` and `gaugenet canonicalize` end to end on a saved model."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from gaugenet.cli._app import _register, app

_register()
ARCH = """
import torch
from torch import nn
def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
class Loop(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)
    def forward(self, x):
        while x.sum() > 0:
            x = self.l(x) - 1
        return x
def untraceable():
    return Loop()
"""


def _setup(tmp_path):
    (tmp_path / "arch.py").write_text(ARCH)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    torch.save(net.state_dict(), tmp_path / "w.pt")
    return net, f"{tmp_path / 'arch.py'}:net"


def test_inspect_and_canonicalize(tmp_path) -> None:
    net, arch = _setup(tmp_path)
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "w.pt"), "--arch", arch, "--certify"])
    assert r.exit_code == 0, r.output
    assert "scale:0" in r.output and "unexplained           0" in r.output
    out = tmp_path / "c.safetensors"
    r = CliRunner().invoke(
        app, ["canonicalize", str(tmp_path / "w.pt"), "--arch", arch, "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    state = load_file(str(out))
    new = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    new.load_state_dict(state)
    x = torch.randn(32, 4)
    assert torch.allclose(net(x), new(x), atol=1e-5)
    assert not torch.allclose(net[0].weight, new[0].weight)  # the weights did change
    # refusing to overwrite, then --force
    r = CliRunner().invoke(
        app, ["canonicalize", str(tmp_path / "w.pt"), "--arch", arch, "--out", str(out)]
    )
    assert r.exit_code == 2 and "already exists" in r.output
    r = CliRunner().invoke(
        app, ["canonicalize", str(tmp_path / "w.pt"), "--arch", arch, "--out", str(out), "--force"]
    )
    assert r.exit_code == 0, r.output


def test_pickled_file_rejected(tmp_path) -> None:
    net, arch = _setup(tmp_path)
    torch.save({"model": net}, tmp_path / "pickled.pt")
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "pickled.pt"), "--arch", arch])
    assert r.exit_code == 2 and "weights-only" in r.output


def test_untraceable_model_error(tmp_path) -> None:
    _setup(tmp_path)
    r = CliRunner().invoke(app, ["inspect", f"{tmp_path / 'arch.py'}:untraceable"])
    assert r.exit_code == 2 and "cannot capture" in r.output


CNN_ARCH = """
import torch
from torch import nn
def cnn():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    with torch.no_grad():  # badly balanced channels: equalization has work to do
        net[0].weight.mul_(torch.tensor([8.0, 0.1, 1.0, 3.0])[:, None, None, None])
        net[0].bias.mul_(torch.tensor([8.0, 0.1, 1.0, 3.0]))
    return net
"""


def test_equalize_command(tmp_path) -> None:
    (tmp_path / "cnn.py").write_text(CNN_ARCH)
    spec = f"{tmp_path / 'cnn.py'}:cnn"
    out = tmp_path / "eq.safetensors"
    r = CliRunner().invoke(
        app, ["equalize", spec, "--bits", "4", "--input-shape", "1,8,8", "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert "SQNR" in r.output
    from gaugenet.io import load_model

    before = load_model(spec)
    after = load_model(spec)
    after.load_state_dict(load_file(str(out)))
    x = torch.randn(16, 1, 8, 8)
    assert torch.allclose(before(x), after(x), atol=1e-5 * float(before(x).abs().max()))
    assert not torch.allclose(before[0].weight, after[0].weight)
    # an existing output is refused without --force
    r = CliRunner().invoke(
        app, ["equalize", spec, "--bits", "4", "--input-shape", "1,8,8", "--out", str(out)]
    )
    assert r.exit_code == 2 and "already exists" in r.output

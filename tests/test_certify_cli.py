"""`gaugenet inspect --certify`: the verdict as the exit code (0 complete, 3 incomplete or
not proven complete, 4 wrong), documented in --help."""

from __future__ import annotations

from typer.testing import CliRunner

from gaugenet.cli._app import _register, app
from gaugenet.cli._certify_report import EXIT_CODES

_register()
ARCH = """
import torch
from torch import nn
from gaugenet.groups import RescalingFactor, Scale

def good():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))

class Rnn(nn.Module):
    def __init__(self):
        super().__init__()
        # ReLU cell: its hidden units rescale (W_ih, W_hh, b and the reader), which
        # discovery does not analyze inside the module
        self.rnn = nn.RNN(4, 3, batch_first=True, nonlinearity="relu")
        self.out = nn.Linear(3, 2)
    def forward(self, x):
        return self.out(self.rnn(x)[0][:, -1])
    def example_inputs(self, n):
        return torch.randn(n, 3, 4, generator=torch.Generator().manual_seed(0))

def rnn():
    torch.manual_seed(0)
    return Rnn()

class Bad(nn.Module):
    '''Describes itself with a 'rescaling' that forgets the next layer.'''
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
    def forward(self, x):
        return self.b(torch.relu(self.a(x)))
    def gauge_factors(self, prefix):
        row = torch.tensor([0, 1, 1, 1, 1, 1])
        terms = (Scale("a.weight", row.reshape(6, 1), 1), Scale("a.bias", row, 1))
        return [RescalingFactor("forgetful", 1, terms=terms)], []

def bad():
    return Bad()
"""


def _run(tmp_path, factory: str, *extra: str):
    (tmp_path / "arch_cert.py").write_text(ARCH)
    return CliRunner().invoke(
        app, ["inspect", f"{tmp_path / 'arch_cert.py'}:{factory}", "--certify", *extra]
    )


def test_complete_exits_zero(tmp_path) -> None:
    r = _run(tmp_path, "good")
    assert r.exit_code == EXIT_CODES["complete"] == 0, r.output
    assert "verdict               complete" in r.output


def test_wrong_factor_is_dropped_by_discovery_and_named(tmp_path) -> None:
    """A self-described factor that changes the outputs never reaches certification:
    discovery's self-check drops it and names it among the breakers."""
    r = _run(tmp_path, "bad")
    assert r.exit_code == EXIT_CODES["incomplete"] == 3, r.output
    assert "forgetful: internal error" in r.output


def test_wrong_exits_four(tmp_path, monkeypatch) -> None:
    """A group with a wrong factor (built by hand, past discovery's self-check) gets the
    verdict wrong, and the command exits 4."""
    import importlib

    import torch

    import gaugenet
    from gaugenet.groups import GaugeGroup

    inspect_cli = importlib.import_module("gaugenet.cli._inspect")
    (tmp_path / "arch_cert.py").write_text(ARCH)
    spec = importlib.util.spec_from_file_location("arch_cert", tmp_path / "arch_cert.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    bad = mod.bad().double()
    factors, _ = bad.gauge_factors("")
    group = GaugeGroup(tuple(factors), (), tuple(n for n, _ in bad.named_parameters()))
    x = torch.randn(64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def run_certify(net, _group, **_kw):
        return gaugenet.certify(bad, x, group=group)

    monkeypatch.setattr(inspect_cli, "run_certify", run_certify)
    r = _run(tmp_path, "good")
    assert r.exit_code == EXIT_CODES["wrong"] == 4, r.output
    assert "wrong factor forgetful" in r.output


def test_unanalysed_rnn_exits_three(tmp_path) -> None:
    r = _run(tmp_path, "rnn", "--inputs", "64")
    assert r.exit_code == EXIT_CODES["incomplete"] == 3, r.output
    assert "unsupported module RNN" in r.output and "verdict               incomplete" in r.output


def test_budget_too_small_is_an_error(tmp_path) -> None:
    r = _run(tmp_path, "good", "--memory-budget", "1e-6")
    assert r.exit_code == 2 and "memory budget" in r.output


def test_help_documents_exit_codes() -> None:
    r = CliRunner().invoke(app, ["inspect", "--help"])
    text = " ".join(r.output.split())
    assert "0 complete" in text and "4 wrong" in text and "3 incomplete" in text

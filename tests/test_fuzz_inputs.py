"""Property-based: random bytes and random shapes into every loader and command-line option
give a `GaugeError` (the commands: exit code 2 with one error line), never a traceback."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from typer.testing import CliRunner

from gaugenet import GaugeError
from gaugenet.cli._app import _register, app
from gaugenet.cli._model_args import parse_shape
from gaugenet.io import MAX_INPUT_NUMBERS, load_model, load_state_dict, sample_inputs

_register()
FAST = settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
ARCH = """
import torch
from torch import nn
def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
"""
DIMS = st.one_of(st.integers(-3, 12), st.just(10**9))


@pytest.fixture
def arch(tmp_path) -> str:
    (tmp_path / "arch.py").write_text(ARCH)
    return f"{tmp_path / 'arch.py'}:net"


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth", ".bin"])
@FAST
@given(data=st.binary(max_size=2048))
def test_random_bytes_into_weight_loaders(tmp_path, suffix, data) -> None:
    path = tmp_path / f"w{suffix}"
    path.write_bytes(data)
    with pytest.raises(GaugeError):
        load_state_dict(path)


@FAST
@given(data=st.binary(max_size=512))
def test_random_bytes_as_hf_config(tmp_path, data) -> None:
    (tmp_path / "config.json").write_bytes(data)
    with pytest.raises(GaugeError):
        load_model(str(tmp_path))


@FAST
@given(shapes=st.lists(st.lists(DIMS, max_size=3), min_size=4, max_size=4))
def test_random_shapes_into_a_weights_file(tmp_path, arch, shapes) -> None:
    keys = ["0.weight", "0.bias", "2.weight", "2.bias"]
    ok = [[6, 4], [6], [3, 6], [3]]
    shapes = [[abs(d) % 7 for d in s] for s in shapes]  # small: the file is written
    torch.save({k: torch.zeros(s) for k, s in zip(keys, shapes)}, tmp_path / "w.pt")
    if shapes == ok:
        assert isinstance(load_model(str(tmp_path / "w.pt"), arch), nn.Module)
    else:
        with pytest.raises(GaugeError, match="has shape"):
            load_model(str(tmp_path / "w.pt"), arch)


@FAST
@given(n=st.integers(-2, 8), shape=st.lists(DIMS, max_size=4))
def test_random_shapes_into_sample_inputs(n, shape) -> None:
    net = nn.Linear(4, 2)
    if n >= 1 and min(shape, default=1) > 0 and n * math.prod(shape) <= MAX_INPUT_NUMBERS:
        assert sample_inputs(net, n, shape=tuple(shape)).shape == (n, *shape)
    else:
        with pytest.raises(GaugeError):
            sample_inputs(net, n, shape=tuple(shape))


@FAST
@given(text=st.text(max_size=30))
def test_random_text_into_parse_shape(text) -> None:
    try:
        shape = parse_shape(text)
    except GaugeError:
        return
    assert shape and min(shape) > 0 and math.prod(shape) <= MAX_INPUT_NUMBERS


def _clean(r) -> None:
    assert "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code in (0, 2), r.output
    if r.exit_code == 2 and r.stderr.startswith("error:"):
        assert len(r.stderr.strip().splitlines()) == 1


OPTIONS = st.sampled_from(
    [
        ("inspect", "--input-shape"),
        ("inspect", "--inputs"),
        ("canonicalize", "--gauge"),
        ("canonicalize", "--input-shape"),
        ("equalize", "--bits"),
        ("equalize", "--granularity"),
        ("inspect", "--arch"),
    ]
)


@FAST
@given(option=OPTIONS, value=st.text(max_size=20).filter(lambda t: not t.startswith("-")))
def test_random_option_values(tmp_path, arch, option, value) -> None:
    command, flag = option
    args = [command, arch, flag, value]
    if command != "inspect":
        args += ["--out", str(tmp_path / "o.safetensors"), "--force"]
    _clean(CliRunner().invoke(app, args))


@FAST
@given(spec=st.text(min_size=1, max_size=40).filter(lambda t: not t.startswith("-")))
def test_random_model_specs(spec) -> None:
    _clean(CliRunner().invoke(app, ["inspect", spec]))

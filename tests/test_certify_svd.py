"""`certify`'s SVD falls back to numpy's LAPACK, then to the transpose, where torch's
`gesdd` fails to converge (it did on an orbit-projected basis of DeBERTa-v2's kernel)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gaugenet.certify import _svd

F64 = torch.float64


def _failing(times: int):
    real, calls = torch.linalg.svd, []

    def svd(a, full_matrices=True):
        calls.append(a.shape)
        if len(calls) <= times:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(a, full_matrices=full_matrices)

    return svd, calls


@pytest.mark.parametrize("full", [True, False])
def test_a_failed_gesdd_falls_back_to_numpy(monkeypatch, full) -> None:
    a = torch.randn(7, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    fake, calls = _failing(1)
    monkeypatch.setattr(torch.linalg, "svd", fake)
    u, s, vh = _svd.svd(a, full_matrices=full)
    assert len(calls) == 1 and u.dtype == F64 and u.shape == ((7, 7) if full else (7, 4))
    assert (u[:, :4] * s @ vh - a).abs().max() < 1e-13
    assert torch.allclose(s, torch.linalg.svdvals(a), atol=1e-13)


def test_then_to_the_transpose(monkeypatch) -> None:
    a = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    fake, calls = _failing(1)
    monkeypatch.setattr(torch.linalg, "svd", fake)

    def numpy_fails(*args, **kwargs):
        raise np.linalg.LinAlgError("SVD did not converge")

    monkeypatch.setattr(np.linalg, "svd", numpy_fails)
    u, s, vh = _svd.svd(a, full_matrices=False)
    assert calls == [(5, 3), (3, 5)]
    assert (u * s @ vh - a).abs().max() < 1e-13


def test_when_nothing_converges_the_first_error_is_raised(monkeypatch) -> None:
    fake, _ = _failing(10)
    monkeypatch.setattr(torch.linalg, "svd", fake)
    monkeypatch.setattr(
        np.linalg, "svd", lambda *a, **k: (_ for _ in ()).throw(np.linalg.LinAlgError())
    )
    with pytest.raises(torch.linalg.LinAlgError, match="converge"):
        _svd.svd(torch.eye(3, dtype=F64))

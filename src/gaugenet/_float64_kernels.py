"""Float64 stand-ins for operations that have no float64 kernel.

gaugenet measures on float64 copies of a model. Some operations refuse float64 on the CPU:
`torch._grouped_mm` (`torch.nn.functional.grouped_mm`), with which `transformers` runs a
mixture of experts' weights (`(experts, in, out)`, the tokens sorted by expert and cut by
`offs`). Inside `float64_kernels()`, such a call on float64 operands is computed from its
definition with ordinary products, one group at a time; every other call runs as it is.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["float64_kernels", "grouped_mm_reference"]


def grouped_mm_reference(
    a: Tensor, b: Tensor, offs: Tensor | None = None, bias: Tensor | None = None
) -> Tensor:
    """`grouped_mm(a, b, offs=offs, bias=bias)` by its definition.

    - `a` `(S, K)`, `b` `(G, K, N)`, `offs` `(G,)` increasing ends: rows
      `offs[g−1] ≤ s < offs[g]` of `a` times `b[g]`; rows from `offs[-1]` on are zero.
    - `a` `(G, S, K)`, `b` `(G, K, N)`, no `offs`: `a[g] @ b[g]` (a batched product).

    `bias` (`(G, N)`) is added to each group's rows. **Returns:** `(S, N)` or `(G, S, N)`."""
    if a.dim() == 3 and b.dim() == 3 and offs is None:
        out = torch.bmm(a, b)
        return out if bias is None else out + bias[:, None, :]
    if a.dim() != 2 or b.dim() != 3 or offs is None:
        raise NotImplementedError(f"grouped_mm of {a.dim()}D by {b.dim()}D operands")
    ends = offs.tolist()
    parts, start = [], 0
    for g, end in enumerate(ends):
        y = a[start:end] @ b[g]
        parts.append(y if bias is None else y + bias[g])
        start = end
    parts.append(a.new_zeros(a.shape[0] - start, b.shape[-1]))
    return torch.cat(parts)


_GROUPED = {torch._grouped_mm}
if hasattr(torch.nn.functional, "grouped_mm"):
    _GROUPED.add(torch.nn.functional.grouped_mm)


class float64_kernels(TorchFunctionMode):
    """Context manager: float64 `grouped_mm` calls computed by `grouped_mm_reference`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _GROUPED:
            a, b = [*args, kwargs.get("mat_a"), kwargs.get("mat_b")][:2]
            wide = isinstance(a, Tensor) and isinstance(b, Tensor) and a.dtype == torch.float64
            if wide and kwargs.get("out_dtype") in (None, torch.float64):
                try:
                    return grouped_mm_reference(a, b, kwargs.get("offs"), kwargs.get("bias"))
                except NotImplementedError:  # another layout: torch's own call decides
                    pass
        return func(*args, **kwargs)

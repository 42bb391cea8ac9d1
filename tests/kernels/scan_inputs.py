"""Random inputs for the scan kernels' tests, shared by test_scan.py and test_ssd_triton.py."""

from __future__ import annotations

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as in tests/kernels/conftest.py


def ssd_inputs(B, T, H, P, G, N, dtype, with_h0=True, seed=0) -> list:
    """[x, dt, A, B, C, h0] for ssd_scan, leaves requiring grad: dt = softplus(...) > 0, A < 0, B and C
    scaled by 1/sqrt(N) so the state stays O(1) over long T; h0 None unless with_h0."""
    g = torch.Generator().manual_seed(seed)

    def leaf(t):
        return t.to(DEVICE, dtype).requires_grad_()

    x = leaf(torch.randn(B, T, H, P, generator=g))
    dt = leaf(torch.nn.functional.softplus(torch.randn(B, T, H, generator=g) - 1))
    A = leaf(-torch.exp(torch.randn(H, generator=g) * 0.5))
    Bm = leaf(torch.randn(B, T, G, N, generator=g) / N**0.5)
    Cm = leaf(torch.randn(B, T, G, N, generator=g) / N**0.5)
    h0 = leaf(torch.randn(B, H, P, N, generator=g)) if with_h0 else None
    return [x, dt, A, Bm, Cm, h0]

"""Local attention at the Pointformer block shapes, fwd and fwd+bwd, against
torch's SDPA, in one process with the implementations interleaved per round
(median ms). Used to measure the ISA dispatch change (issue 11); run it with
each build on PYTHONPATH to compare builds on one machine."""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from dynkernels import ops

SHAPES = [(4096, 8, 64, 8), (2048, 8, 32, 16), (1024, 8, 16, 32), (512, 8, 16, 64)]  # (G, H, S, D)


def _time(fn, rounds):
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _shape(g: int, h: int, s: int, d: int, rounds: int) -> None:
    q, k, v = (torch.randn(g, h, s, d, requires_grad=True) for _ in range(3))
    rows = torch.zeros(g, dtype=torch.int64)
    grad = torch.randn(g, h, s, d)

    def ours_fwd():
        with torch.no_grad():
            ops.local_attention(q, k, v, row_index=rows, backend="cpp")

    def sdpa_fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v)

    def ours_bwd():
        out, w = ops.local_attention(q, k, v, row_index=rows, backend="cpp")
        torch.autograd.grad((out * grad).sum() + w.sum(), (q, k, v))

    def sdpa_bwd():
        out = F.scaled_dot_product_attention(q, k, v)
        torch.autograd.grad((out * grad).sum(), (q, k, v))

    for name, a, b in (("fwd", ours_fwd, sdpa_fwd), ("fwd+bwd", ours_bwd, sdpa_bwd)):
        a(), b()  # warm up
        ta, tb = [], []
        for _ in range(rounds):
            ta += _time(a, 1)
            tb += _time(b, 1)
        ma, mb = statistics.median(ta) * 1e3, statistics.median(tb) * 1e3
        print(f"{g:>6} {h} {s:>3} {d:>3} {name:>8} {ma:>11.2f} {mb:>8.2f} {mb / ma:>5.2f}x")


def main(rounds: int = 15) -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'G H S D':>18} {'pass':>8} {'dynkernels':>11} {'SDPA':>8} {'ratio':>6}")
    for g, h, s, d in SHAPES:
        _shape(g, h, s, d, rounds)


if __name__ == "__main__":
    main()

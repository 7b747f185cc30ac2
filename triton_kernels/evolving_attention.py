"""Triton kernels for Evolving Attention's map step (mix, head-mixing KxK
convolution over the (query, key) plane, activation, residual, masked softmax).

One program per query row (b, i) and all heads: for a chunk of BLOCK_J keys it
gathers the K*K shifted neighbours of every head into a (taps, keys) tile
X[(hi, di, dj), j] = M[b, hi, i + di - r, j + dj - r] (zero outside the map) and
convolves all heads at once as one matrix product Z = W (H, taps) @ X. The
forward writes A once and keeps an online softmax (row max and sum per head)
over the chunks; a second sweep over the row turns A + mask into P.

The backward runs in two kernels:
  1. per block of ROWS query rows: recompute Z, dA = gA + P (gP - <gP, P>),
     dZ = w_conv act'(Z) dA (to a float32 scratch), (1 - w_conv) dA (into the
     float32 dM scratch), and the block's partial dW = dZ @ X^T and dbias;
     the partials are summed afterwards in a fixed order (deterministic).
  2. per query row: dM += conv^T(dZ), which is the same gathered product with
     the flipped, head-swapped kernel; dS = (1 - w_prev) dM, dA_prev = w_prev dM.

Naming ladder: ``_evolve_fwd_kernel`` (jit) -> ``evolve_logits_fwd`` (launcher)
-> ``dynkernels.ops.evolve_attention_logits``.

Shapes: logits, prev (B, H, N, N) contiguous; weight (H, H, K, K); bias (H,);
mask additive (B, H, N, N) with any strides. Products and sums run in float32
(IEEE, no TF32) or float64 for float64 inputs; A and P are stored in the input
dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_ACT_IDENTITY, _ACT_RELU, _ACT_LEAKY = 0, 1, 2


@triton.jit
def _activate(z, ACT: tl.constexpr, slope):
    # NaN propagates as in torch: relu(NaN) = NaN, and its gradient passes.
    if ACT == 1:
        z = tl.where(z < 0, 0.0, z)
    elif ACT == 2:
        z = tl.where(z > 0, z, z * slope)
    return z


@triton.jit
def _activate_grad(z, ACT: tl.constexpr, slope):
    if ACT == 1:
        g = tl.where(z <= 0, 0.0, 1.0)
    elif ACT == 2:
        g = tl.where(z > 0, 1.0, slope)
    else:
        g = tl.full(z.shape, 1.0, tl.float32)
    return g


@triton.jit
def _load_params(params_ptr):
    """(w_prev, w_conv, slope), stored in the compute dtype: a scalar argument would arrive as float32."""
    return tl.load(params_ptr), tl.load(params_ptr + 1), tl.load(params_ptr + 2)


@triton.jit
def _load_weight(w_ptr, heads, taps, H, K: tl.constexpr, COMPUTE: tl.constexpr):
    """The (H, H*K*K) weight matrix as a (BLOCK_H, BLOCK_T) tile, zero outside."""
    ok = (heads[:, None] < H) & (taps[None, :] < H * K * K)
    return tl.load(w_ptr + heads[:, None] * (H * K * K) + taps[None, :], mask=ok, other=0.0).to(COMPUTE)


@triton.jit
def _load_bias(bias_ptr, heads, H, HAS_BIAS: tl.constexpr, BLOCK_H: tl.constexpr, COMPUTE: tl.constexpr):
    if HAS_BIAS:
        bias = tl.load(bias_ptr + heads, mask=heads < H, other=0.0).to(COMPUTE)
    else:
        bias = tl.zeros([BLOCK_H], COMPUTE)
    return bias


@triton.jit
def _gather_taps(
    a_ptr, b_ptr, w_a, w_b, base, i, cols, taps, H, N, K: tl.constexpr, HAS_B: tl.constexpr, COMPUTE: tl.constexpr
):
    """X[t, j] = w_a a[hi, i + di - r, j + dj - r] (+ w_b b[...]) with t = (hi * K + di) * K + dj,
    zero outside the map, for the image at `base`."""
    r = K // 2
    hi = taps // (K * K)
    di = (taps // K) % K
    dj = taps % K
    row = i + di - r
    col = cols[None, :] + dj[:, None] - r
    ok = (taps[:, None] < H * K * K) & (row[:, None] >= 0) & (row[:, None] < N) & (col >= 0) & (col < N)
    ok = ok & (cols[None, :] < N)
    off = base + (hi[:, None] * N + row[:, None]) * N + col
    x = tl.load(a_ptr + off, mask=ok, other=0.0).to(COMPUTE) * w_a
    if HAS_B:
        x += tl.load(b_ptr + off, mask=ok, other=0.0).to(COMPUTE) * w_b
    return x


@triton.jit
def _center(a_ptr, b_ptr, w_a, w_b, base, i, heads, cols, H, N, HAS_B: tl.constexpr, COMPUTE: tl.constexpr):
    """M[h, i, j] = w_a a + w_b b for every head h and key j of the chunk."""
    ok = (heads[:, None] < H) & (cols[None, :] < N)
    off = base + (heads[:, None] * N + i) * N + cols[None, :]
    m = tl.load(a_ptr + off, mask=ok, other=0.0).to(COMPUTE) * w_a
    if HAS_B:
        m += tl.load(b_ptr + off, mask=ok, other=0.0).to(COMPUTE) * w_b
    return m


@triton.jit
def _evolve_fwd_kernel(
    s_ptr,
    prev_ptr,
    w_ptr,
    bias_ptr,
    mask_ptr,
    a_ptr,
    p_ptr,
    H,
    N,
    msb,
    msh,
    msi,
    msj,
    params_ptr,
    K: tl.constexpr,
    ACT: tl.constexpr,
    HAS_PREV: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_J: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    w_prev, w_conv, slope = _load_params(params_ptr)
    pid = tl.program_id(0)
    b = pid // N
    i = pid % N
    base = b * H * N * N
    heads = tl.arange(0, BLOCK_H)
    taps = tl.arange(0, BLOCK_T)
    w = _load_weight(w_ptr, heads, taps, H, K, COMPUTE)
    bias = _load_bias(bias_ptr, heads, H, HAS_BIAS, BLOCK_H, COMPUTE)
    keep = 1.0 - w_prev
    row_max = tl.full([BLOCK_H], float("-inf"), COMPUTE)
    row_sum = tl.zeros([BLOCK_H], COMPUTE)
    out_off = base + (heads[:, None] * N + i) * N
    # Sweep 1: A, stored once, and the online max and sum of A + mask per head
    # (taken on A as stored, so P below is the softmax of exactly what was written).
    for j0 in range(0, N, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        ok = (heads[:, None] < H) & (cols[None, :] < N)
        x = _gather_taps(s_ptr, prev_ptr, keep, w_prev, base, i, cols, taps, H, N, K, HAS_PREV, COMPUTE)
        z = tl.dot(w, x, input_precision="ieee", out_dtype=COMPUTE) + bias[:, None]
        m = _center(s_ptr, prev_ptr, keep, w_prev, base, i, heads, cols, H, N, HAS_PREV, COMPUTE)
        a = (w_conv * _activate(z, ACT, slope) + (1.0 - w_conv) * m).to(a_ptr.dtype.element_ty)
        tl.store(a_ptr + out_off + cols[None, :], a, mask=ok)
        x = tl.where(ok, a.to(COMPUTE), float("-inf"))
        if HAS_MASK:
            x += tl.load(
                mask_ptr + b * msb + heads[:, None] * msh + i * msi + cols[None, :] * msj, mask=ok, other=0.0
            ).to(COMPUTE)
        new_max = tl.maximum(row_max, tl.max(x, axis=1))
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp(row_max - safe) + tl.sum(tl.exp(x - safe[:, None]), axis=1)
        row_max = new_max
    tl.debug_barrier()  # sweep 2 reads A written by other threads of this program
    # Sweep 2: P = exp(A + mask - max) / sum.
    for j0 in range(0, N, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        ok = (heads[:, None] < H) & (cols[None, :] < N)
        x = tl.load(a_ptr + out_off + cols[None, :], mask=ok, other=float("-inf")).to(COMPUTE)
        if HAS_MASK:
            x += tl.load(
                mask_ptr + b * msb + heads[:, None] * msh + i * msi + cols[None, :] * msj, mask=ok, other=0.0
            ).to(COMPUTE)
        # A fully masked row has max -inf: (-inf) - (-inf) is NaN, as torch.softmax gives.
        p = tl.exp(x - row_max[:, None]) / row_sum[:, None]
        tl.store(p_ptr + out_off + cols[None, :], p.to(p_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _kept(mask_ptr, b, heads, i, cols, msb, msh, msi, msj, ok):
    """Where the additive mask does not set the key to -inf."""
    m = tl.load(mask_ptr + b * msb + heads[:, None] * msh + i * msi + cols[None, :] * msj, mask=ok, other=0.0)
    return m != float("-inf")


@triton.jit
def _evolve_bwd_rows_kernel(
    s_ptr,
    prev_ptr,
    w_ptr,
    bias_ptr,
    p_ptr,
    mask_ptr,
    ga_ptr,
    gp_ptr,
    dz_ptr,
    dm_ptr,
    dw_ptr,
    db_ptr,
    H,
    N,
    msb,
    msh,
    msi,
    msj,
    params_ptr,
    K: tl.constexpr,
    ACT: tl.constexpr,
    HAS_PREV: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_GA: tl.constexpr,
    HAS_GP: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_J: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    w_prev, w_conv, slope = _load_params(params_ptr)
    blocks = tl.cdiv(N, ROWS)
    pid = tl.program_id(0)
    b = pid // blocks
    i0 = (pid % blocks) * ROWS
    base = b * H * N * N
    heads = tl.arange(0, BLOCK_H)
    taps = tl.arange(0, BLOCK_T)
    w = _load_weight(w_ptr, heads, taps, H, K, COMPUTE)
    bias = _load_bias(bias_ptr, heads, H, HAS_BIAS, BLOCK_H, COMPUTE)
    keep = 1.0 - w_prev
    dw = tl.zeros([BLOCK_H, BLOCK_T], COMPUTE)
    db = tl.zeros([BLOCK_H], COMPUTE)
    for i in range(i0, tl.minimum(i0 + ROWS, N)):
        out_off = base + (heads[:, None] * N + i) * N
        dot = tl.zeros([BLOCK_H], COMPUTE)
        if HAS_GP:
            for j0 in range(0, N, BLOCK_J):
                cols = j0 + tl.arange(0, BLOCK_J)
                ok = (heads[:, None] < H) & (cols[None, :] < N)
                if HAS_MASK:  # keys masked by -inf pass no gradient and add nothing to the dot
                    ok = ok & _kept(mask_ptr, b, heads, i, cols, msb, msh, msi, msj, ok)
                gp = tl.load(gp_ptr + out_off + cols[None, :], mask=ok, other=0.0).to(COMPUTE)
                p = tl.load(p_ptr + out_off + cols[None, :], mask=ok, other=0.0).to(COMPUTE)
                dot += tl.sum(gp * p, axis=1)
        for j0 in range(0, N, BLOCK_J):
            cols = j0 + tl.arange(0, BLOCK_J)
            ok = (heads[:, None] < H) & (cols[None, :] < N)
            da = tl.zeros([BLOCK_H, BLOCK_J], COMPUTE)
            if HAS_GA:
                da += tl.load(ga_ptr + out_off + cols[None, :], mask=ok, other=0.0).to(COMPUTE)
            if HAS_GP:
                kept = ok
                if HAS_MASK:
                    kept = ok & _kept(mask_ptr, b, heads, i, cols, msb, msh, msi, msj, ok)
                gp = tl.load(gp_ptr + out_off + cols[None, :], mask=kept, other=0.0).to(COMPUTE)
                p = tl.load(p_ptr + out_off + cols[None, :], mask=kept, other=0.0).to(COMPUTE)
                da += tl.where(kept, p * (gp - dot[:, None]), 0.0)
            x = _gather_taps(s_ptr, prev_ptr, keep, w_prev, base, i, cols, taps, H, N, K, HAS_PREV, COMPUTE)
            z = tl.dot(w, x, input_precision="ieee", out_dtype=COMPUTE) + bias[:, None]
            dz = tl.where(ok, w_conv * da * _activate_grad(z, ACT, slope).to(COMPUTE), 0.0)
            tl.store(dz_ptr + out_off + cols[None, :], dz, mask=ok)
            tl.store(dm_ptr + out_off + cols[None, :], (1.0 - w_conv) * da, mask=ok)
            dw += tl.dot(dz, tl.trans(x), input_precision="ieee", out_dtype=COMPUTE)
            db += tl.sum(dz, axis=1)
    tl.store(dw_ptr + pid * BLOCK_H * BLOCK_T + heads[:, None] * BLOCK_T + taps[None, :], dw)
    tl.store(db_ptr + pid * BLOCK_H + heads, db)


@triton.jit
def _evolve_bwd_transpose_kernel(
    dz_ptr,
    wf_ptr,
    dm_ptr,
    ds_ptr,
    dprev_ptr,
    H,
    N,
    params_ptr,
    K: tl.constexpr,
    HAS_PREV: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_J: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    w_prev = tl.load(params_ptr)
    pid = tl.program_id(0)
    b = pid // N
    i = pid % N
    base = b * H * N * N
    heads = tl.arange(0, BLOCK_H)
    taps = tl.arange(0, BLOCK_T)
    wf = _load_weight(wf_ptr, heads, taps, H, K, COMPUTE)
    out_off = base + (heads[:, None] * N + i) * N
    for j0 in range(0, N, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        ok = (heads[:, None] < H) & (cols[None, :] < N)
        x = _gather_taps(dz_ptr, dz_ptr, 1.0, 0.0, base, i, cols, taps, H, N, K, False, COMPUTE)
        dm = tl.load(dm_ptr + out_off + cols[None, :], mask=ok, other=0.0) + tl.dot(
            wf, x, input_precision="ieee", out_dtype=COMPUTE
        )
        tl.store(ds_ptr + out_off + cols[None, :], ((1.0 - w_prev) * dm).to(ds_ptr.dtype.element_ty), mask=ok)
        if HAS_PREV:
            tl.store(dprev_ptr + out_off + cols[None, :], (w_prev * dm).to(dprev_ptr.dtype.element_ty), mask=ok)


def _blocks(heads: int, k: int, n: int) -> tuple[int, int, int]:
    # tl.dot needs every dimension >= 16.
    return (
        max(16, triton.next_power_of_2(heads)),
        max(16, triton.next_power_of_2(heads * k * k)),
        max(16, min(64, triton.next_power_of_2(n))),
    )


def _common_args(logits, prev, weight, bias):
    """The leading pointer arguments every kernel but the transpose takes (absent
    tensors stand in as any valid pointer; the HAS_* flags keep them unread)."""
    return (logits, prev if prev is not None else logits, weight.contiguous(), bias if bias is not None else weight)


def _meta(logits, heads: int, k: int, n: int) -> dict:
    block_h, block_t, block_j = _blocks(heads, k, n)
    return dict(K=k, BLOCK_H=block_h, BLOCK_T=block_t, BLOCK_J=block_j, COMPUTE=_compute_dtype(logits))


def _compute_dtype(x: torch.Tensor):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _params(x: torch.Tensor, w_prev: float, w_conv: float, slope: float) -> torch.Tensor:
    return torch.tensor([w_prev, w_conv, slope], dtype=_scratch_dtype(x), device=x.device)


def _mask_strides(mask: torch.Tensor | None) -> tuple[int, int, int, int]:
    return mask.stride() if mask is not None else (0, 0, 0, 0)


def _scratch_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def evolve_logits_fwd(logits, prev, weight, bias, w_prev, w_conv, activation, slope, mask):
    """(A, P) for contiguous logits (B, H, N, N); mask additive, expanded, or None."""
    b, h, n, _ = logits.shape
    k = weight.shape[-1]
    evolved = logits.new_empty(logits.shape)
    probs = logits.new_empty(logits.shape)
    if logits.numel() == 0:
        return evolved, probs
    _evolve_fwd_kernel[(b * n,)](
        *_common_args(logits, prev, weight, bias),
        mask if mask is not None else logits,
        evolved,
        probs,
        h,
        n,
        *_mask_strides(mask),
        _params(logits, w_prev if prev is not None else 0.0, w_conv, slope),
        ACT=activation,
        HAS_PREV=prev is not None,
        HAS_BIAS=bias is not None,
        HAS_MASK=mask is not None,
        **_meta(logits, h, k, n),
    )
    return evolved, probs


# Query rows per program of backward kernel 1 (also the granularity of the
# weight-gradient partials, summed in program order afterwards).
_ROWS = 16


def evolve_logits_bwd(
    grad_evolved, grad_probs, logits, prev, weight, bias, probs, w_prev, w_conv, activation, slope, mask
):
    """(d_logits, d_prev or (0,), d_weight, d_bias or (0,)), as the C++ op; keys
    the mask sets to -inf pass no gradient."""
    b, h, n, _ = logits.shape
    k = weight.shape[-1]
    d_logits = logits.new_empty(logits.shape)
    # Absent inputs get empty (0,) gradients, distinct tensors (outputs must not alias).
    d_prev = logits.new_empty(logits.shape) if prev is not None else logits.new_empty((0,))
    if logits.numel() == 0:
        return (
            d_logits,
            d_prev,
            torch.zeros_like(weight),
            torch.zeros_like(bias) if bias is not None else logits.new_empty((0,)),
        )
    meta = _meta(logits, h, k, n)
    scratch = _scratch_dtype(logits)
    dz = torch.empty(logits.shape, dtype=scratch, device=logits.device)
    dm = torch.empty(logits.shape, dtype=scratch, device=logits.device)
    programs = b * triton.cdiv(n, _ROWS)
    dw_part = torch.empty((programs, meta["BLOCK_H"], meta["BLOCK_T"]), dtype=scratch, device=logits.device)
    db_part = torch.empty((programs, meta["BLOCK_H"]), dtype=scratch, device=logits.device)
    _evolve_bwd_rows_kernel[(programs,)](
        *_common_args(logits, prev, weight, bias),
        probs,
        mask if mask is not None else logits,
        grad_evolved if grad_evolved is not None else logits,
        grad_probs if grad_probs is not None else logits,
        dz,
        dm,
        dw_part,
        db_part,
        h,
        n,
        *_mask_strides(mask),
        _params(logits, w_prev if prev is not None else 0.0, w_conv, slope),
        ACT=activation,
        HAS_PREV=prev is not None,
        HAS_BIAS=bias is not None,
        HAS_MASK=mask is not None,
        HAS_GA=grad_evolved is not None,
        HAS_GP=grad_probs is not None,
        ROWS=_ROWS,
        **meta,
    )
    # conv^T as a convolution: W'[hi, ho, a, c] = W[ho, hi, K-1-a, K-1-c].
    flipped = weight.flip(2, 3).transpose(0, 1).contiguous()
    _evolve_bwd_transpose_kernel[(b * n,)](
        dz,
        flipped,
        dm,
        d_logits,
        d_prev if prev is not None else d_logits,
        h,
        n,
        _params(logits, w_prev if prev is not None else 0.0, 0.0, 0.0),
        HAS_PREV=prev is not None,
        **meta,
    )
    # Partials summed in program order: deterministic.
    d_weight = dw_part.sum(0)[:h, : h * k * k].reshape(weight.shape).to(weight.dtype)
    d_bias = db_part.sum(0)[:h].to(bias.dtype) if bias is not None else logits.new_empty((0,))
    return d_logits, d_prev, d_weight, d_bias

"""The Triton source of the GPU kernel (:mod:`ipfx.ops.gpu` says what it computes and when it runs).

Imported only where Triton is (:func:`ipfx.ops.gpu._kernel`); under ``TRITON_INTERPRET=1`` ``triton.jit``
gives Triton's interpreter, which runs the same source on CPU tensors.
"""

import triton
import triton.language as tl


@triton.jit
def sparse_direct_conv(
    x, crow, col, val, bias, y,
    c_in, c_out, d_in, h_in, w_in, d_out, h_out, w_out,
    k0, k1, k2, s0, s1, s2, p0, p1, p2, l0, l1, l2,
    TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    n = tl.program_id(2)
    o = tl.program_id(1)
    p_out = d_out * h_out * w_out
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < p_out
    od = offs // (h_out * w_out)
    oh = (offs // w_out) % h_out
    ow = offs % w_out
    kk = k0 * k1 * k2
    x_sample = x + n.to(tl.int64) * c_in * d_in * h_in * w_in
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    start = tl.load(crow + o)
    end = tl.load(crow + o + 1)
    for e in range(start, end):
        c = tl.load(col + e)
        v = tl.load(val + e)
        i = c // kk
        t = c % kk
        t0 = t // (k1 * k2)
        t1 = (t // k2) % k1
        t2 = t % k2
        if TRANSPOSED:  # in = (p + pad - t * dil) / stride, where exact and in range
            a0 = od + p0 - t0 * l0
            a1 = oh + p1 - t1 * l1
            a2 = ow + p2 - t2 * l2
            ok = (a0 >= 0) & (a1 >= 0) & (a2 >= 0)
            a0 = tl.where(ok, a0, 0)
            a1 = tl.where(ok, a1, 0)
            a2 = tl.where(ok, a2, 0)
            ok = ok & (a0 % s0 == 0) & (a1 % s1 == 0) & (a2 % s2 == 0)
            i0 = a0 // s0
            i1 = a1 // s1
            i2 = a2 // s2
        else:  # in = p * stride - pad + t * dil
            i0 = od * s0 - p0 + t0 * l0
            i1 = oh * s1 - p1 + t1 * l1
            i2 = ow * s2 - p2 + t2 * l2
            ok = (i0 >= 0) & (i1 >= 0) & (i2 >= 0)
        ok = ok & live & (i0 < d_in) & (i1 < h_in) & (i2 < w_in)
        where = ((i.to(tl.int64) * d_in + i0) * h_in + i1) * w_in + i2  # int64: large 3-d inputs
        xv = tl.load(x_sample + tl.where(ok, where, 0), mask=ok, other=0.0)
        acc += v * xv.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias + o).to(tl.float32)
    out = y + (n.to(tl.int64) * c_out + o) * p_out + offs
    tl.store(out, acc.to(y.dtype.element_ty), mask=live)


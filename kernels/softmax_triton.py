"""The online-softmax step shared by the Triton attention kernels (decode and prefill).

Scores are in log2 units (the callers scale by log2(e) / sqrt(d)); rows whose scores are all
-inf so far (padded query rows, empty splits) keep m = -inf and add nothing.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def online_softmax_step(s, v, m_i, l_i, acc):
    """Fold scores s [M, N] (masked entries -inf) and values v [N, DV] into the running max
    m_i [M], sum l_i [M] and unnormalised output acc [M, DV] (fp32): (m, l, acc)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc

"""A language-model head's logit transform inside Triton kernels (``fusedecode.head_transform`` is the
torch side): ``y = z * logit_scale``, then with ``SOFTCAP`` ``y = softcap * tanh(y / softcap)``,
and its derivative ``dy/dz = logit_scale * (1 - tanh^2)``.

Triton has no portable tanh (libdevice's does not run under the interpreter), so it is built from
``e = exp(-2|u|)``: ``tanh(u) = sign(u) (1 - e) / (1 + e)`` and ``1 - tanh(u)^2 = 4 e / (1 + e)^2``,
neither of which cancels for large ``|u|``. Below ``|u| = 3/8``, where ``1 - e`` would cancel, the odd
Taylor series through ``u^13`` (truncation error under 2e-9 relative) keeps tanh's relative accuracy.
NaN stays NaN and ``u = +-inf`` gives ``+-1`` with derivative 0.
"""

import triton
import triton.language as tl

SERIES_BELOW = tl.constexpr(0.375)


@triton.jit
def tanh_and_derivative(u):
    """``(tanh(u), 1 - tanh(u)^2)`` in float32."""
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)
    from_exp = (1.0 - e) / (1.0 + e)
    a2 = a * a
    series = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (
        62.0 / 2835.0 + a2 * (-1382.0 / 155925.0 + a2 * (21844.0 / 6081075.0)))))))
    magnitude = tl.where(a < SERIES_BELOW, series, from_exp)
    t = tl.where(u < 0, -magnitude, magnitude)
    return t, 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def apply_head_transform(z, logit_scale, softcap, SOFTCAP: tl.constexpr):
    """``(y, dy/dz)`` of the head transform at the logits ``z`` (bias already added)."""
    y = z * logit_scale
    if SOFTCAP:
        t, slope = tanh_and_derivative(y / softcap)
        y = softcap * t
        slope = slope * logit_scale
    else:
        slope = tl.zeros_like(z) + logit_scale  # not 0 * z + scale: NaN where z is infinite
    return y, slope

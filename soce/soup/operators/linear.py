"""``linear``: the weighted average of the candidates, soce's soup (no base).

``soup = round(fma-accumulate(w_j * M_j) / sum w_j)``: float32 accumulator (float64 for float64 inputs) from
+0, one fused multiply-add per candidate in order, one division by the weights' sum unless it is 1, one
rounding to the output dtype (bit for bit mergekit 0.1.5's ``linear``). The arithmetic is
:func:`soce.soup.arith.mix_into` (CPU and torch on GPU) and :func:`soce.soup.kernel.fused_mix` (one Triton
kernel on GPU); this module only names it in the registry.
"""

from soce.soup.arith import Coefficients, mix_into, reference_soup

__all__ = ["Coefficients", "mix_into", "reference_soup"]

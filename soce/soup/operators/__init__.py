"""Merge operators: how the candidates' tensors combine into one soup tensor (arithmetic only, no I/O).

One registry, :data:`OPERATORS`, names every operator; :class:`MergeSpec` is an operator with its parameters
(mergekit's names and meanings: ``density``, ``lambda``, ``normalize``, ``rescale``; ``seed`` for DARE's drop
masks). One module per operator:

* :mod:`.linear`: the weighted average of the candidates (soce's soup of old; no base).
* :mod:`.task_arithmetic`: ``base + lambda * sum_j w_j * (M_j - base)`` (optionally divided by ``sum w_j``).
* :mod:`.ties`: trim each task vector to its ``density`` largest magnitudes (per tensor), elect the sign of
  the weighted sum per element, average the agreeing entries (``dare_ties`` uses the same election);
  :mod:`.sort_cut` finds the entries mergekit's sort keeps, without sorting.
* :mod:`.dare`: drop entries of each task vector at random (kept with probability ``density``, masks from a
  counter-based hash of seed, tensor and candidate), rescale to the task vector's L1 norm.

The engines (:func:`soce.soup.write_soup`, :class:`soce.soup.Remixer`) call :func:`.task_vectors.prepare` once
per tensor (the parts that need the whole tensor: TIES' trim, the L1 norms of a rescale) and
:func:`.task_vectors.mix_chunk` per chunk; both are bit for bit what mergekit 0.1.5 computes with
``dtype: float32`` (float64 for float64 inputs) and ``out_dtype`` = the output dtype (see those modules).
On a GPU the Remixer runs ``task_arithmetic`` and ``ties`` through one fused kernel per tensor with the same
bits (:mod:`soce.soup.task_kernel`).
"""

from soce.soup.operators.spec import OPERATORS, MergeSpec, Operator, get_operator

__all__ = ["OPERATORS", "MergeSpec", "Operator", "get_operator"]

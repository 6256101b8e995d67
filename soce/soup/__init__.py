"""Linear soups of fine-tuned checkpoints: streamed to disk, or re-mixed in memory.

A soup of candidates M_1..M_n with weights w_1..w_n is, for every tensor key of the candidates'
safetensors files, ``sum_j w_j * T_j / sum_j w_j``. Bit for bit: a float32 accumulator (float64 if an input
is float64) starts at +0 and takes ``acc = fma(w_j, T_j, acc)`` (one rounding per term, torch ``addcmul_``)
in the order of the ``models`` mapping, with the weights as float32; it is divided by their float32 sum
unless that is exactly 1; then rounded once to the output dtype. This is :func:`reference_soup`, and
exactly what mergekit 0.1.5's linear merge computes (CPU and ``--cuda``). The unfused
``sum(w * t.float())`` rounds twice per term and differs in ~1% of bf16 elements by one unit in the last
place. Candidates whose weight is 0 do not take part.

Two paths compute it with the same elementwise operations (so their results are identical):

* :func:`write_soup` streams chunk by chunk from memory-mapped safetensors files into a sharded Hugging Face
  checkpoint directory, written atomically (temporary sibling directory, renamed at the end). Peak memory
  is a few chunk buffers, independent of model size.
* :class:`Remixer` keeps the experts resident (GPU when there is one and they fit, else CPU) and writes each
  new soup into the parameters of one live ``transformers`` model in place.

Every input problem raises :class:`SoupError` whose message is one line naming the file and tensor.
"""

from soce.soup.arith import Coefficients, mix_into, reference_soup
from soce.soup.checks import check_models, check_weights
from soce.soup.io import Checkpoint, SoupError, TensorInfo, open_checkpoint, read_header
from soce.soup.remix import Remixer
from soce.soup.writer import parse_size, write_soup

__all__ = [
    "Checkpoint",
    "Coefficients",
    "Remixer",
    "SoupError",
    "TensorInfo",
    "check_models",
    "check_weights",
    "mix_into",
    "open_checkpoint",
    "parse_size",
    "read_header",
    "reference_soup",
    "write_soup",
]

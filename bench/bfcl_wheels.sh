#!/usr/bin/env bash
# Wheels for bench/bfcl_cost.py on an offline GPU image (torch + transformers already there), into
# outputs/wheels-bfcl/ (about 6 MB; the carry limit is 64 MiB). Run it here, where PyPI is reachable:
#   bash bench/bfcl_wheels.sh            # CPython 3.10-3.13, Linux x86_64 (the image's version is unknown)
# and on the GPU machine (no internet):
#   pip install --no-index --find-links outputs/wheels-bfcl --no-deps -r requirements-bfcl.txt \
#       hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 PyYAML packaging
# All are pure Python except tree-sitter (one wheel per CPython version, fetched for each below) and PyYAML
# (images with transformers have it). soce itself travels as the working tree (bench/ puts it on sys.path).
# The H200 image (probed 2026-12-01): CPython 3.12.3, torch 2.11.0+cu130, transformers 5.17.0, with numpy, pandas,
# requests, tqdm, PyYAML, packaging; without hydra-core, omegaconf, bfcl-eval and its checker's modules.
# tree-sitter 0.21.3 has no CPython 3.13 wheel (it would build from source there).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=outputs/wheels-bfcl
PY=${PYTHON:-python3}
mkdir -p "$OUT"
# pure-Python: bfcl-eval and what its checker imports, soce's config layer (hydra-core, omegaconf)
$PY -m pip download -q --no-deps -d "$OUT" -r requirements-bfcl.txt hydra-core==1.3.8 omegaconf==2.3.1 packaging
# antlr4-python3-runtime 4.9.3 (omegaconf's parser) is an sdist on PyPI: build its (pure) wheel here
$PY -m pip wheel -q --no-deps -w "$OUT" antlr4-python3-runtime==4.9.3
# binary: tree-sitter 0.21.3 per CPython version (the grammars are abi3 wheels: one fits all)
for v in 3.10 3.11 3.12 3.13; do
  $PY -m pip download -q --no-deps -d "$OUT" --only-binary=:all: --platform manylinux2014_x86_64 \
      --python-version "$v" --implementation cp tree-sitter==0.21.3 PyYAML==6.0.2 || echo "no wheel for $v"
done
ls -la "$OUT"
du -sh "$OUT"

#!/usr/bin/env bash
# Create .venv-litert, the virtualenv of LiteRT-LM's converter (litert-torch) and runtime
# (litert-lm-api), pinned by requirements-litert.txt. It stays apart from .venv: litert-torch
# brings jax, ai-edge-litert and a protobuf of its own.
# It also downloads the aarch64 litert-lm-api wheel a Raspberry Pi 5 (or the emulated one) needs
# into .venv-litert/device-wheels/: litert_bench.py runs there with only that wheel and the
# standard library. The wheel is py3-none-manylinux_2_27_aarch64 (glibc >= 2.27: Bookworm has 2.36).
# Idempotent: the virtualenv records the sha256 of the requirements it was built from, and a
# second run with the same file does nothing. pip's own wheel cache keeps a rebuild quick.
# Usage: bench/setup-litert.sh [python]   (default: python3, which must be 3.11 like .venv's)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}
venv=.venv-litert
stamp="$venv/.requirements-litert.sha256"
want=$(sha256sum requirements-litert.txt | cut -d' ' -f1)
api=$(sed -n 's/^litert-lm-api==//p' requirements-litert.txt)
device_wheel="$venv/device-wheels/litert_lm_api-$api-py3-none-manylinux_2_27_aarch64.whl"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -f "$device_wheel" ] \
    && "$venv/bin/python" -c "import importlib.metadata as m; m.version('litert-torch'); m.version('litert-lm-api')" 2>/dev/null; then
  echo "$venv is up to date with requirements-litert.txt"
  exit 0
fi
started=$(date +%s)
rm -f "$stamp"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/pip" install -q -r requirements-litert.txt
"$venv/bin/pip" check
# pip does not widen an explicit --platform to older manylinux tags, so name the wheel's own.
"$venv/bin/pip" download -q --no-deps --only-binary :all: --platform manylinux_2_27_aarch64 --python-version 3.11 \
  -d "$venv/device-wheels" "litert-lm-api==$api"
[ -f "$device_wheel" ] || { echo "pip did not download $device_wheel" >&2; exit 1; }
echo "$want" > "$stamp"
echo "$venv ready in $(( $(date +%s) - started )) s, $(du -sh "$venv" | cut -f1) on disk"

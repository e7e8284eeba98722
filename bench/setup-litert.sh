#!/usr/bin/env bash
# Create .venv-litert, the virtualenv of LiteRT-LM's converter (litert-torch) and runtime
# (litert-lm-api), pinned by requirements-litert.txt. It stays apart from .venv: litert-torch
# brings jax, ai-edge-litert and a protobuf of its own.
# A device's runtime is not made here: the workflow fetches the litert-lm-api wheel for each
# target's CPU itself (rule litert_runtime).
# Idempotent: the virtualenv records the sha256 of the requirements it was built from, and a
# second run with the same file does nothing. pip's own wheel cache keeps a rebuild quick.
# Usage: bench/setup-litert.sh [python]   (default: python3, which must be 3.11 like .venv's)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}
venv=.venv-litert
stamp="$venv/.requirements-litert.sha256"
want=$(sha256sum requirements-litert.txt | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
    && "$venv/bin/python" -c "import importlib.metadata as m; m.version('litert-torch'); m.version('litert-lm-api')" 2>/dev/null; then
  echo "$venv is up to date with requirements-litert.txt"
  exit 0
fi
started=$(date +%s)
rm -f "$stamp"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/pip" install -q -r requirements-litert.txt
"$venv/bin/pip" check
echo "$want" > "$stamp"
echo "$venv ready in $(( $(date +%s) - started )) s, $(du -sh "$venv" | cut -f1) on disk"

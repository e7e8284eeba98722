#!/usr/bin/env bash
# Build llama.cpp (llama-cpp-python, pinned in requirements-bench.txt) from its PyPI source
# distribution into the project's virtualenv, and unpack llama.cpp's own convert_hf_to_gguf.py
# from the same archive into .bench/llama.cpp/, where the `gguf` rule looks for it.
# Usage: bench/setup-llamacpp.sh [python]   (default: .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-.venv/bin/python}
version=$(sed -n 's/^llama-cpp-python==//p' requirements-bench.txt)
[ -n "$version" ] || { echo "requirements-bench.txt pins no llama-cpp-python version" >&2; exit 1; }
dest=.bench
sdist="$dest/llama_cpp_python-$version.tar.gz"
mkdir -p "$dest"
if [ ! -f "$sdist" ]; then
  "$python" -m pip download -q --no-deps --no-binary :all: -d "$dest" "llama-cpp-python==$version"
fi
# The build (several minutes on two cores) is kept as a wheel in a per-machine cache, keyed by the
# CPU's feature flags: llama.cpp compiles for the CPU it is built on, so a wheel is reused only on
# the same kind of CPU (a fresh clone, or CI on the same machine, then installs in seconds).
cpu=$(grep -m1 -E '^(flags|Features)' /proc/cpuinfo | sha256sum | cut -c1-12)
cache="${GEMMA_EDGE_CACHE:-$HOME/.cache/gemma-edge}/llama-cpp-python/$version-$(uname -m)-$cpu"
wheel=$(ls "$cache"/llama_cpp_python-"$version"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
  echo "building llama-cpp-python $version from source (several minutes on two cores), cached in $cache"
  mkdir -p "$cache.tmp-$$"
  "$python" -m pip wheel -q --no-deps -w "$cache.tmp-$$" "$sdist"
  rm -rf "$cache" && mv "$cache.tmp-$$" "$cache"
  wheel=$(ls "$cache"/llama_cpp_python-"$version"-*.whl | head -n 1)
fi
if ! "$python" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama_cpp_python') != '$version')" 2>/dev/null; then
  "$python" -m pip install -q "$wheel"
fi
rm -rf "$dest/llama.cpp" "$dest/unpack"
mkdir -p "$dest/unpack"
tar -xzf "$sdist" -C "$dest/unpack" \
  "llama_cpp_python-$version/vendor/llama.cpp/convert_hf_to_gguf.py" \
  "llama_cpp_python-$version/vendor/llama.cpp/conversion" \
  "llama_cpp_python-$version/vendor/llama.cpp/gguf-py"
mv "$dest/unpack/llama_cpp_python-$version/vendor/llama.cpp" "$dest/llama.cpp"
rm -rf "$dest/unpack"
echo "llama-cpp-python $version installed; converter at $dest/llama.cpp/convert_hf_to_gguf.py"

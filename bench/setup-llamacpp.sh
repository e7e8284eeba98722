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
if ! "$python" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama_cpp_python') != '$version')" 2>/dev/null; then
  echo "building llama-cpp-python $version from source (several minutes on two cores)"
  "$python" -m pip install -q "$sdist"
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

"""Peak memory of the export step with the checkpoint read two ways: `checkpoint.StoredTensors`
(pread into fresh tensors) against safetensors' own lazy reader (`safe_open(...).get_slice(name)`,
over a memory mapping). `checkpoint.StoredTensors`'s docstring carries the result.

Usage: .venv/bin/python bench/checkpoint_rss.py results/<model>/checkpoint.json {pread,safe_open}

Runs the export step's own code (`pipeline.export`) in this process, into a scratch folder, and
prints the peak RSS after loading the checkpoint and after the whole step. Run each way in its own
process (the peak is per process), on a machine with memory to spare: the figures are what the
step costs, not what the machine can afford.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from gemma_edge import checkpoint  # noqa: E402

DTYPES = checkpoint.StoredTensors.DTYPES


class SafeOpenTensors:
    """StoredTensors' interface over safetensors' `safe_open` and its lazy slices."""

    def __init__(self, folder: Path):
        self.paths = sorted(Path(folder).glob("*.safetensors"))

    def __enter__(self):
        from safetensors import safe_open

        self.files, self.owner = [], {}
        for path in self.paths:
            handle = safe_open(str(path), framework="pt")
            self.files.append(handle)
            for key in handle.keys():
                self.owner[key] = handle
        return self

    def __exit__(self, *exc):
        self.files = []

    def dtypes(self):
        return {DTYPES[handle.get_slice(key).get_dtype()] for key, handle in self.owner.items()}

    def read(self, name, loaded):
        key = self._key(name)
        if key is None:
            return loaded.detach()
        value = self.owner[key].get_tensor(key)
        if tuple(value.shape) != tuple(loaded.shape):
            raise ValueError(f"{key} is stored with shape {tuple(value.shape)}, the model expects {tuple(loaded.shape)}")
        return value

    def read_rows(self, name, start, stop):
        key = self._key(name)
        return self.owner[key].get_slice(key)[start:stop]

    def _key(self, name):
        for key in (name, name.replace("model.", "model.language_model.", 1)):
            if key in self.owner:
                return key
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="results/<model>/checkpoint.json")
    parser.add_argument("reader", choices=["pread", "safe_open"])
    args = parser.parse_args()

    from gemma_edge import pipeline
    from gemma_edge.artifacts import peak_rss_mb

    if args.reader == "safe_open":
        checkpoint.StoredTensors = SafeOpenTensors
    loaded = {}
    original = checkpoint.load_for_export

    def load_and_measure(folder):
        model = original(folder)
        loaded["peak_mb_after_load"] = round(peak_rss_mb())
        return model

    checkpoint.load_for_export = load_and_measure
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "program.pt2"
        manifest = pipeline.export(args.checkpoint, 128, "float32", "executorch", out, Path(folder) / "program.pt2.manifest.json")
    print(json.dumps({"reader": args.reader, **loaded, "peak_mb_whole_step": round(peak_rss_mb()),
                      "program_bytes": manifest["size_bytes"], "program_sha256": manifest["sha256"]}))


if __name__ == "__main__":
    main()

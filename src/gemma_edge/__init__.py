"""Step logic of the Gemma 4 → ExecuTorch workflow, importable and testable without Snakemake."""

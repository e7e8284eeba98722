"""The workflow's plumbing: the config and its schema, variant paths, manifests, step logs, the
terminal, and the working directory's stale lock."""

"""A real OpenSSH server on loopback (moved to gemma_edge.loopback_sshd; re-exported for the tests)."""

from gemma_edge.loopback_sshd import SshServer, free_port, keygen  # noqa: F401

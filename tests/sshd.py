"""A real OpenSSH server on loopback (moved to gemma_edge.reach.loopback_sshd; re-exported for the tests)."""

from gemma_edge.reach.loopback_sshd import SshServer, free_port, keygen  # noqa: F401

"""Reaching a device: SSH, the device's lock and storage, the wheelhouse, provisioning, deploy and
the remote benchmark, the emulated Pi 5 and its sshd."""

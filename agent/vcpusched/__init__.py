"""vcpusched: keeps the vCPUs of libvirt/QEMU domains balanced across a host's pCPUs."""

__version__ = "0.1.0"

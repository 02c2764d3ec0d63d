"""The libvirt + QEMU lab: real libvirtd, tiny TCG guests with set loads (see lab.py)."""

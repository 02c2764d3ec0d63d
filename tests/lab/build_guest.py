"""Build the lab guest: Debian's kernel as an uncompressed ELF and a busybox initramfs.

Run by setup.sh with the system Python (standard library only). Each part is rebuilt only when
its inputs change, so a second run takes well under a second.

The guest boots the ELF `vmlinux` instead of the bzImage: QEMU enters it through PVH, which
skips the in-guest decompression that dominates boot time under TCG (about 2.5 s against 6 s).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import lzma
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

KERNEL_META = "linux-image-amd64"
GUEST_SRC = Path(__file__).resolve().parent / "guest"
BUSYBOX = Path("/bin/busybox")


def log(msg: str) -> None:
    print(f"build_guest: {msg}", flush=True)


def kernel_package() -> str:
    """The versioned kernel package the metapackage points at (its name changes with ABI bumps)."""
    out = subprocess.run(
        ["apt-cache", "depends", KERNEL_META], check=True, capture_output=True, text=True
    ).stdout
    for line in out.splitlines():
        key, _, value = line.strip().partition(": ")
        if key == "Depends" and value.startswith("linux-image-"):
            return value.strip()
    raise SystemExit(f"build_guest: cannot resolve {KERNEL_META} (run apt-get update)")


def extract_vmlinuz(deb: Path, dest: Path) -> str:
    """Copy boot/vmlinuz-* out of the .deb; return the kernel release."""
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as p:
        assert p.stdout is not None
        with tarfile.open(fileobj=p.stdout, mode="r|") as tar:
            for member in tar:
                name = member.name.lstrip("./")
                if name.startswith("boot/vmlinuz-") and member.isfile():
                    src = tar.extractfile(member)
                    assert src is not None
                    dest.write_bytes(src.read())
                    release = name.removeprefix("boot/vmlinuz-")
                    break
            else:
                raise SystemExit(f"build_guest: no boot/vmlinuz-* in {deb.name}")
        p.stdout.read()
    return release


def bzimage_to_elf(bzimage: bytes) -> bytes:
    """Unpack the compressed payload of an x86 bzImage, which is the kernel's ELF image.

    The setup header says where the payload is: it starts `payload_offset` bytes into the
    protected-mode part, which follows the (setup_sects + 1) real-mode sectors.
    """
    if bzimage[0x202:0x206] != b"HdrS":
        raise ValueError("not a bzImage (no HdrS signature)")
    setup_sects = bzimage[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = bzimage[start : start + payload_length]
    if payload.startswith(b"\xfd7zXZ\x00"):
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    elif payload.startswith(b"\x1f\x8b"):
        elf = gzip.GzipFile(fileobj=io.BytesIO(payload)).read()
    else:
        raise ValueError(f"unsupported payload compression (magic {payload[:6].hex()})")
    if not elf.startswith(b"\x7fELF"):
        raise ValueError("payload is not an ELF image")
    return elf


def build_kernel(guest: Path) -> None:
    stamp = guest / "kernel.txt"
    if (guest / "vmlinux").is_file() and stamp.is_file():
        log(f"kernel {stamp.read_text().strip()} already built")
        return
    package = kernel_package()
    with tempfile.TemporaryDirectory(prefix="lab-kernel-") as tmp:
        # apt drops privileges to _apt for downloads; let it write here.
        if _has_user("_apt"):
            shutil.chown(tmp, user="_apt")
        log(f"downloading {package}")
        subprocess.run(["apt-get", "download", "-q", package], cwd=tmp, check=True)
        deb = next(Path(tmp).glob("*.deb"))
        vmlinuz = guest / "vmlinuz"
        release = extract_vmlinuz(deb, vmlinuz)
    elf = bzimage_to_elf(vmlinuz.read_bytes())
    tmp_elf = guest / "vmlinux.tmp"
    tmp_elf.write_bytes(elf)
    tmp_elf.rename(guest / "vmlinux")
    stamp.write_text(f"{package} {release}\n")
    log(f"kernel {release}: vmlinuz {vmlinuz.stat().st_size} B, vmlinux {len(elf)} B")


def _has_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


class Cpio:
    """A minimal writer of the "newc" cpio format the kernel unpacks as initramfs."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        encoded = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self.ino += 1
        self.out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        self._pad()
        self.out.write(data)
        self._pad()

    def _pad(self) -> None:
        self.out.write(b"\0" * (-self.out.tell() % 4))

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o755) -> None:
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.out.getvalue()


def build_initramfs(guest: Path) -> None:
    init = (GUEST_SRC / "init").read_bytes()
    source = (GUEST_SRC / "load.c").read_bytes()
    busybox = BUSYBOX.read_bytes()
    digest = hashlib.sha256(init + source + busybox).hexdigest()
    stamp = guest / "initramfs.sha256"
    target = guest / "initramfs.gz"
    if target.is_file() and stamp.is_file() and stamp.read_text().strip() == digest:
        log("initramfs up to date")
        return
    with tempfile.TemporaryDirectory(prefix="lab-initramfs-") as tmp:
        binary = Path(tmp) / "lab-load"
        subprocess.run(
            [
                "gcc",
                "-static",
                "-O2",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-o",
                str(binary),
                str(GUEST_SRC / "load.c"),
            ],
            check=True,
        )
        load = binary.read_bytes()
    cpio = Cpio()
    for d in ("bin", "dev", "proc", "sys", "tmp"):
        cpio.directory(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3)
    cpio.file("bin/busybox", busybox)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("bin/lab-load", load)
    cpio.file("init", init)
    # mtime 0 keeps the image identical between builds from the same inputs.
    data = gzip.compress(cpio.finish(), compresslevel=9, mtime=0)
    (guest / "lab-load").write_bytes(load)
    tmp_target = guest / "initramfs.gz.tmp"
    tmp_target.write_bytes(data)
    tmp_target.rename(target)
    stamp.write_text(digest + "\n")
    log(f"initramfs {len(data)} B")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("state_dir", type=Path)
    args = parser.parse_args()
    guest = args.state_dir / "guest"
    guest.mkdir(parents=True, exist_ok=True)
    os.umask(0o022)
    build_kernel(guest)
    build_initramfs(guest)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/bin/sh
# Prepare this host for the libvirt + QEMU lab: packages, the users the QEMU driver expects,
# qemu.conf, and the guest image (kernel + initramfs) in the state dir.
#
# Idempotent: a second run checks and returns in about a second. Needs root.
# State dir: $VCPUSCHED_LAB_DIR, default <repo>/.lab
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
state=${VCPUSCHED_LAB_DIR:-$repo/.lab}
marker="# Managed by vcpusched tests/lab/setup.sh; delete this line to keep local edits."

# libvirt-daemon-system is left out on purpose: without systemd it only adds polkit,
# firewalld and a NAT network that the lab does not use.
packages="libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config
qemu-system-x86 busybox-static gcc libc6-dev python3 python3-dev python3-venv util-linux"

say() { echo "setup: $*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "setup: must run as root" >&2
    exit 1
fi

updated=0
apt_update() {
    if [ "$updated" -eq 0 ]; then
        apt-get -o DPkg::Lock::Timeout=600 update -q
        updated=1
    fi
}

missing=""
for p in $packages; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing="$missing $p"
done
if [ -n "$missing" ]; then
    say "installing$missing"
    apt_update
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q \
        --no-install-recommends $missing
else
    say "packages present"
fi

# The QEMU driver resolves its built-in default user before reading qemu.conf, so it refuses
# to start without these even though the guests run as root.
getent group kvm >/dev/null || groupadd -r kvm
getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
getent passwd libvirt-qemu >/dev/null ||
    useradd -r -g kvm -G libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu

# stdio_handler=file: QEMU's output goes straight to a file, so no virtlogd is needed.
conf=/etc/libvirt/qemu.conf
wanted="$marker
user = \"root\"
group = \"root\"
dynamic_ownership = 0
remember_owner = 0
security_driver = \"none\"
stdio_handler = \"file\""
mkdir -p /etc/libvirt /var/log/libvirt/qemu /var/lib/libvirt/qemu
if [ ! -e "$conf" ] || [ "$(head -n 1 "$conf")" = "$marker" ]; then
    if [ ! -e "$conf" ] || [ "$(cat "$conf")" != "$wanted" ]; then
        printf '%s\n' "$wanted" >"$conf"
        say "wrote $conf (a libvirtd already running keeps its old settings until restarted)"
    fi
else
    say "warning: $conf is not ours, left as is; the lab expects: $(echo "$wanted" | tail -n +2 | tr '\n' ';')" >&2
fi

mkdir -p "$state"
if [ ! -f "$state/guest/vmlinux" ]; then
    # The kernel comes from the archive; make sure the package lists exist.
    apt-cache show linux-image-amd64 >/dev/null 2>&1 || apt_update
fi
python3 "$here/build_guest.py" "$state"
say "lab ready in $state"

#!/bin/sh
# Prepare this machine for the role test (tests/role): host packages, plus a Debian 12 root file
# system that systemd-nspawn can boot as the role's target host.
#
# Idempotent; must run as root. The rootfs is cached as a zstd tarball in $VCPUSCHED_TEST_CACHE
# (default /var/cache/vcpusched-test), named after a hash of everything that goes into it, so a
# later run on the same machine skips debootstrap and a changed package list rebuilds it.
# The last line on stdout is the tarball's path.
set -eu

CACHE=${VCPUSCHED_TEST_CACHE:-/var/cache/vcpusched-test}
SUITE=bookworm
HOST_PACKAGES="systemd-container debootstrap zstd openssh-client"
# What a hypervisor host has before the role runs. The role itself installs python3-libvirt,
# python3-yaml and python3-packaging, so they are deliberately absent: the test then proves the
# role's own package list is complete. sudo because site.yml uses become. libpam-systemd provides
# the logind that polkitd (pulled by libvirt-daemon-system) needs: debootstrap does not resolve
# that virtual package by itself and would leave libvirt unconfigured.
INCLUDE="systemd,systemd-sysv,libpam-systemd,dbus,openssh-server,python3,python3-venv,rsyslog,libvirt-daemon-system,iproute2,procps,sudo,ca-certificates"
# Bump when the customisation below changes, so the cached tarball is rebuilt.
CUSTOMIZE_VERSION=1

log() { printf '%s setup: %s\n' "$(date +%T)" "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    echo "tests/role/setup.sh: must run as root (debootstrap, systemd-nspawn)" >&2
    exit 1
fi

missing=""
for pkg in $HOST_PACKAGES; do
    if ! dpkg-query -W -f '${db:Status-Status}\n' "$pkg" 2>/dev/null | grep -qx installed; then
        missing="$missing $pkg"
    fi
done
if [ -n "$missing" ]; then
    log "installing$missing"
    # Another job may hold the dpkg lock for a while on a shared machine.
    apt-get -o DPkg::Lock::Timeout=900 update -q >&2
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y -q \
        --no-install-recommends $missing >&2
fi

# The Debian mirror this machine already uses (deb822 .sources first, then one-line .list).
mirror=""
for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    mirror=$(awk '
        /^URIs:/ { uri = $2 }
        /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == "'$SUITE'") ok = 1 }
        /^$/ { if (ok && uri != "") { print uri; exit } ok = 0; uri = "" }
        END { if (ok && uri != "") print uri }' "$f" | head -n 1)
    [ -n "$mirror" ] && break
done
if [ -z "$mirror" ]; then
    mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
        awk '$1 == "deb" && $3 == "'$SUITE'" { print $2; exit }')
fi
mirror=${mirror:-http://deb.debian.org/debian}

key=$(printf '%s|%s|%s' "$SUITE" "$INCLUDE" "$CUSTOMIZE_VERSION" | sha256sum | cut -c1-12)
tarball="$CACHE/$SUITE-role-$key.tar.zst"
mkdir -p "$CACHE"

# One builder at a time; a second caller waits and then finds the tarball.
exec 9>"$CACHE/.lock"
flock 9

if [ -s "$tarball" ]; then
    log "cached rootfs $tarball"
    echo "$tarball"
    exit 0
fi

build=$(mktemp -d "$CACHE/build.XXXXXX")
trap 'rm -rf "$build"' EXIT
root="$build/rootfs"
log "debootstrap $SUITE from $mirror (minbase + $INCLUDE)"
debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$root" "$mirror" >"$build/debootstrap.log" 2>&1 || {
    tail -n 30 "$build/debootstrap.log" >&2
    exit 1
}

log "customising"
echo vcpusched-target >"$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 vcpusched-target\n' >"$root/etc/hosts"
# Empty machine-id: every booted copy gets its own.
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
# Keys only; the per-run port and authorized key are added when a copy is unpacked.
cat >"$root/etc/ssh/sshd_config.d/vcpusched-test.conf" <<'EOF'
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UseDNS no
EOF
# The container shares the host's network namespace: libvirt's default NAT network must not
# come up, or it would add a bridge and firewall rules to the host itself.
rm -f "$root/etc/libvirt/qemu/networks/autostart/default.xml"
chroot "$root" apt-get clean
rm -f "$root/var/log/"*.log

log "packing $tarball"
tar -C "$root" --numeric-owner -cpf - . | zstd -q -T0 -o "$build/rootfs.tar.zst"
mv "$build/rootfs.tar.zst" "$tarball"
# Tarballs for other package lists are stale now.
find "$CACHE" -maxdepth 1 -name "$SUITE-role-*.tar.zst" ! -name "$(basename "$tarball")" -delete
log "done"
echo "$tarball"

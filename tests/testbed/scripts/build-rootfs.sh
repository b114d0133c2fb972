#!/bin/bash
# Build (once) a Debian root filesystem that boots systemd as PID 1 of a container
# (see src/logind/systemd.rs), cached under ${TESTBED_CACHE:-<workspace>/target/testbed}/rootfs/<suite>.
#
# Usage: build-rootfs.sh [trixie|bookworm|bullseye|trixie-polkit]    (default trixie; run as root)
# trixie-polkit: trixie with polkitd, for the non-root lock holder. bullseye: systemd 247, whose
# legacy `reboot` run by root goes around logind.
#
# debootstrap is unpacked from its .deb, never installed, and nothing here touches the
# machine's own systemd or dbus. Idempotent: a finished build leaves a stamp file whose
# content names the inputs; a build whose stamp matches is not redone.
set -euo pipefail

suite=${1:-trixie}
case "$suite" in
  trixie|bookworm) release=$suite; base=systemd,systemd-sysv,dbus,dbus-bin; extra= ;;
  # Before bookworm the bus daemon is in the dbus package itself (no dbus-bin).
  bullseye) release=$suite; base=systemd,systemd-sysv,dbus; extra= ;;
  trixie-polkit) release=trixie; base=systemd,systemd-sysv,dbus,dbus-bin; extra=,libpam-systemd,polkitd ;;
  *) echo "build-rootfs.sh: unknown suite '$suite' (trixie|bookworm|bullseye|trixie-polkit)" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { echo "build-rootfs.sh: must run as root" >&2; exit 1; }

here=$(cd "$(dirname "$0")" && pwd)
cache=${TESTBED_CACHE:-$(cd "$here/../../.." && pwd)/target/testbed}
dest=$cache/rootfs/$suite
stamp=$cache/rootfs/$suite.stamp
mirror=${DEBIAN_MIRROR:-$(sed -n 's/^URIs: *\(http[^ ]*debian\/*\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)}
mirror=${mirror:-http://deb.debian.org/debian}
packages=$base$extra
# Bump when the configuration below changes, so cached trees get rebuilt.
recipe="v1 $release minbase $packages"

mkdir -p "$cache/rootfs" "$cache/tools"
# Tests may ask for the same tree at once: one builds, the others wait and reuse it.
exec 9>"$cache/rootfs/$suite.lock"
flock 9

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$recipe" ] && [ -x "$dest/lib/systemd/systemd" ]; then
  echo "rootfs $suite: cached at $dest"
  exit 0
fi

# debootstrap, unpacked (not installed) from the .deb of the machine's own release.
dbs=$cache/tools/debootstrap
if [ ! -x "$dbs/usr/sbin/debootstrap" ]; then
  tmp=$(mktemp -d); chmod 755 "$tmp"   # apt hands the download to user _apt
  (cd "$tmp" && apt-get download debootstrap >/dev/null 2>&1) || {
    apt-get update >/dev/null
    (cd "$tmp" && apt-get download debootstrap >/dev/null)
  }
  rm -rf "$dbs"; mkdir -p "$dbs"
  dpkg -x "$tmp"/debootstrap_*.deb "$dbs"
  rm -rf "$tmp"
fi
export DEBOOTSTRAP_DIR=$dbs/usr/share/debootstrap
# bookworm's debootstrap may not know trixie yet: trixie bootstraps like sid.
[ -e "$DEBOOTSTRAP_DIR/scripts/$release" ] || ln -s sid "$DEBOOTSTRAP_DIR/scripts/$release"

rm -rf "$dest" "$stamp"
start=$(date +%s)
"$dbs/usr/sbin/debootstrap" --variant=minbase --include="$packages" \
  "$release" "$dest" "$mirror" > "$cache/rootfs/$suite.log" 2>&1 || {
  echo "build-rootfs.sh: debootstrap failed, see $cache/rootfs/$suite.log" >&2
  tail -n 20 "$cache/rootfs/$suite.log" >&2
  exit 1
}

# --- configuration for a container boot (no kernel, no udev, no consoles) ---
echo testbed-node > "$dest/etc/hostname"
: > "$dest/etc/machine-id"     # systemd makes a transient one on each boot
# The bed gives the container a /dev/console bound to /dev/null and no ttys.
for unit in console-getty.service getty@tty1.service serial-getty@console.service \
            systemd-udevd.service systemd-udev-trigger.service systemd-udev-settle.service \
            systemd-modules-load.service systemd-remount-fs.service systemd-networkd.service \
            systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer \
            e2scrub_all.timer fstrim.timer dpkg-db-backup.timer \
            sys-kernel-config.mount sys-kernel-debug.mount sys-kernel-tracing.mount \
            sys-fs-fuse-connections.mount dev-hugepages.mount dev-mqueue.mount \
            systemd-binfmt.service proc-sys-fs-binfmt_misc.automount \
            systemd-firstboot.service systemd-hwdb-update.service \
            systemd-journal-catalog-update.service ldconfig.service; do
  ln -sf /dev/null "$dest/etc/systemd/system/$unit"
done
rm -f "$dest/etc/systemd/system/getty.target.wants/"*
# Journal in memory only: a node "disk" should not grow across boots.
mkdir -p "$dest/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\nRuntimeMaxUse=8M\n' > "$dest/etc/systemd/journald.conf.d/testbed.conf"
# Keep the per-boot console short and machine-readable (status lines off, messages on).
mkdir -p "$dest/etc/systemd/system.conf.d"
printf '[Manager]\nShowStatus=no\nDefaultTimeoutStopSec=10s\n' > "$dest/etc/systemd/system.conf.d/testbed.conf"
rm -rf "$dest/var/cache/apt/archives/"*.deb "$dest/var/lib/apt/lists/"* || true

echo "$recipe" > "$stamp"
echo "rootfs $suite: built in $(( $(date +%s) - start )) s at $dest ($(du -sh "$dest" | cut -f1))"

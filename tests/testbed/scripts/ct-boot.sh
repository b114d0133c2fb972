#!/bin/bash
# Boots a Debian root filesystem with its own systemd as PID 1 of fresh pid, mount, uts, ipc,
# net and cgroup namespaces: what systemd-nspawn does, by hand, because installing
# systemd-container would upgrade the machine's own systemd. Started by src/logind/systemd.rs.
#
# Environment (all required):
#   CT_ROOTFS    read-only lower layer (scripts/build-rootfs.sh output)
#   CT_STATE     the node's folder: upper/ and work/ (its persistent "disk"), merged/,
#                boot_id (this boot's ID), bus/ (becomes the container's /run/dbus)
#   CT_CONSOLE   a pseudo-terminal (the caller holds its master) to become /dev/console
#   CT_CGROUP    an empty cgroup v2 folder delegated to the container
#   CT_HOSTNAME  the node's host name
#
# Safety: CAP_SYS_BOOT (and module, time, rawio) leave the bounding set before any namespace
# is made, and the inner part refuses to run unless it is PID 1 of a new PID namespace without
# CAP_SYS_BOOT. systemd's final reboot(2) then fails with EPERM and its PID 1 just exits.
set -euo pipefail
: "${CT_ROOTFS:?}" "${CT_STATE:?}" "${CT_CGROUP:?}" "${CT_HOSTNAME:?}" "${CT_CONSOLE:?}"

if [ "${1:-}" != inner ]; then
  # Joining the delegated cgroup before unshare makes it the root of the new cgroup namespace.
  echo $$ > "$CT_CGROUP/cgroup.procs"
  # --kill-child: if this (outer) process dies, the container's PID 1 dies with it, and so
  # does its whole PID namespace.
  exec capsh --drop=cap_sys_boot,cap_sys_module,cap_sys_time,cap_sys_rawio -- -c \
    'exec unshare --pid --fork --kill-child --mount --uts --ipc --net --cgroup --propagation private "$0" inner' "$0"
fi

[ "$$" = 1 ] || { echo "ct-boot.sh inner: not PID 1 of a new PID namespace" >&2; exit 99; }
bnd=$(awk '/^CapBnd/ {print $2}' /proc/self/status)
if (( (16#$bnd >> 22) & 1 )); then echo "ct-boot.sh inner: CAP_SYS_BOOT still in the bounding set" >&2; exit 98; fi

M=$CT_STATE/merged
mkdir -p "$CT_STATE/upper" "$CT_STATE/work" "$M"
mount -t overlay testbed-node -o "lowerdir=$CT_ROOTFS,upperdir=$CT_STATE/upper,workdir=$CT_STATE/work" "$M"
echo "$CT_HOSTNAME" > "$M/etc/hostname"
# Our own /run (systemd leaves a mounted one alone), with the node's /run/dbus on a host folder:
# its system bus socket is then at a host path, as a DaemonSet pod gets the host's
# /run/dbus through a hostPath volume. (A bind from another mount namespace is refused, so a
# pod could not get at the socket through /proc/<pid>/root once it has its own /proc.)
mount -t tmpfs -o mode=755,nosuid,nodev,size=64m testbed-run "$M/run"
mkdir -p "$M/run/dbus"
mount --bind "$CT_STATE/bus" "$M/run/dbus"
hostname "$CT_HOSTNAME"

mount -t proc proc "$M/proc"
# /proc/sys read-only, as container managers do; then this boot's own ID over the kernel's,
# which every container shares and which survives a container "reboot".
mount --bind "$M/proc/sys" "$M/proc/sys"
mount -o remount,bind,ro "$M/proc/sys"
mount --bind "$CT_STATE/boot_id" "$M/proc/sys/kernel/random/boot_id"
mount -o remount,bind,ro "$M/proc/sys/kernel/random/boot_id"
if [ -e "$M/proc/sysrq-trigger" ]; then
  mount --bind "$M/proc/sysrq-trigger" "$M/proc/sysrq-trigger"
  mount -o remount,bind,ro "$M/proc/sysrq-trigger"
fi
# Read-only sysfs: no /sys/power/state to write, whatever runs inside.
mount -t sysfs -o ro sysfs "$M/sys"
mount -t cgroup2 cgroup2 "$M/sys/fs/cgroup"

# Own device nodes: the machine's /dev/null may not be world-writable, which breaks User=
# services such as dbus-daemon.
mount -t tmpfs -o mode=755,size=1m testbed-dev "$M/dev"
mknod -m 666 "$M/dev/null" c 1 3
mknod -m 666 "$M/dev/zero" c 1 5
mknod -m 666 "$M/dev/full" c 1 7
mknod -m 666 "$M/dev/random" c 1 8
mknod -m 666 "$M/dev/urandom" c 1 9
mknod -m 666 "$M/dev/tty" c 5 0
mkdir -p "$M/dev/pts" "$M/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666 devpts "$M/dev/pts"
ln -s pts/ptmx "$M/dev/ptmx"
ln -s /proc/self/fd "$M/dev/fd"
# PID 1 logs to /dev/console (it must be a terminal): the caller reads the other end and
# timestamps each line, as systemd-nspawn hands a container a pty.
touch "$M/dev/console"
mount --bind "$CT_CONSOLE" "$M/dev/console"

cd "$M"
mkdir -p .testbed-oldroot
pivot_root . .testbed-oldroot
umount -l /.testbed-oldroot
rmdir /.testbed-oldroot
exec env -i container=testbed TERM=dumb /lib/systemd/systemd \
  --log-target=console --log-level=info --show-status=no

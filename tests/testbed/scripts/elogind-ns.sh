#!/bin/bash
# Starts a private system bus and elogind 246 as children of PID 1 of fresh PID, mount and
# cgroup namespaces, with every power command replaced by a marker. Started by
# src/logind/elogind.rs.
#
# Environment (all required):
#   EL_DIR     the instance's folder: system-bus.conf, logind.conf, marker.sh; gets the bus
#              socket, logs, and poweroff-marker (one line per power command run)
#   EL_ROOT    elogind unpacked by scripts/fetch-elogind.sh
#   EL_CGROUP  an empty cgroup v2 folder delegated to the instance
#
# Safety: CAP_SYS_BOOT leaves the bounding set before the namespaces are made, the inner part
# refuses to run otherwise, every power command is the marker, /sys/power is hidden.
set -euo pipefail
: "${EL_DIR:?}" "${EL_ROOT:?}" "${EL_CGROUP:?}"

if [ "${1:-}" != inner ]; then
  echo $$ > "$EL_CGROUP/cgroup.procs"
  exec capsh --drop=cap_sys_boot -- -c \
    'exec unshare --pid --fork --kill-child --mount --mount-proc --cgroup --propagation private "$0" inner' "$0"
fi

[ "$$" = 1 ] || { echo "elogind-ns.sh inner: not PID 1 of a new PID namespace" >&2; exit 99; }
eff=$(awk '/^CapEff/ {print $2}' /proc/self/status)
bnd=$(awk '/^CapBnd/ {print $2}' /proc/self/status)
if (( ((16#$eff | 16#$bnd) >> 22) & 1 )); then echo "elogind-ns.sh inner: CAP_SYS_BOOT present" >&2; exit 98; fi

# 1. Every power path runs the marker (a bind follows symlinks such as poweroff -> systemctl,
#    so each target is covered whichever name elogind uses).
for p in /usr/bin/systemctl /bin/systemctl /usr/sbin/poweroff /sbin/poweroff /usr/sbin/reboot \
         /sbin/reboot /usr/sbin/halt /sbin/halt /usr/sbin/shutdown /sbin/shutdown \
         /usr/sbin/telinit /sbin/telinit /usr/sbin/kexec /sbin/kexec; do
  if [ -e "$p" ]; then mount --bind "$EL_DIR/marker.sh" "$p"; fi
done
# 2. Nothing can reach the machine's sleep states.
mount -t tmpfs -o size=64k,mode=755 testbed-syspower /sys/power
# 3. A private /run: elogind writes /run/systemd/*, /run/elogind.pid, /run/utmp, /run/nologin.
mount -t tmpfs -o mode=755 testbed-run /run
# 4. elogind appends a shutdown record to wtmp before it runs the power command.
if [ -e /var/log/wtmp ]; then
  : > "$EL_DIR/wtmp"; mount --bind "$EL_DIR/wtmp" /var/log/wtmp
else
  mount -t tmpfs -o size=1m,mode=755 testbed-log /var/log
fi
# 5. Our own cgroup v2 (the delegated folder, through the cgroup namespace), so elogind never
#    creates hierarchies in the machine's /sys/fs/cgroup.
mount -t cgroup2 cgroup2 /sys/fs/cgroup

sock=$EL_DIR/system_bus_socket
start_dbus() {
  rm -f "$sock"
  dbus-daemon --config-file="$EL_DIR/system-bus.conf" --nofork --nopidfile >>"$EL_DIR/dbus.log" 2>&1 &
  dbus=$!
  for _ in $(seq 500); do [ -S "$sock" ] && break; sleep 0.01; done
}
start_elogind() {
  DBUS_SYSTEM_BUS_ADDRESS="unix:path=$sock" SYSTEMD_LOG_TARGET=console SYSTEMD_LOG_LEVEL=info \
  ELOGIND_CONF_FILE="$EL_DIR/logind.conf" \
  LD_LIBRARY_PATH="$EL_ROOT/lib/elogind:$EL_ROOT/lib/x86_64-linux-gnu" \
    "$EL_ROOT/lib/elogind/elogind" >>"$EL_DIR/elogind.log" 2>&1 &
  elogind=$!
}
trap 'kill $elogind $dbus 2>/dev/null; exit 0' TERM INT
start_dbus
start_elogind
# Like systemd's Restart=always for both daemons: whichever the bed stops (a logind or bus
# restart, src/logind/elogind.rs) comes back, the bus first.
set +e
while :; do
  wait -n
  sleep 0.05
  kill -0 "$dbus" 2>/dev/null || start_dbus
  kill -0 "$elogind" 2>/dev/null || start_elogind
done

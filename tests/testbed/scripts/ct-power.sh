#!/bin/sh
# Asks a node's logind to power off or reboot, as `systemctl poweroff` / `reboot` do: a D-Bus
# call PowerOff(false) / Reboot(false). Run it in a pod of the node (logind checks the caller,
# which it must be able to see). Used for systemd nodes and elogind alike.
# Usage: ct-power.sh BUS_ADDRESS PowerOff|Reboot
set -u
out=$(busctl --address="$1" call org.freedesktop.login1 /org/freedesktop/login1 \
  org.freedesktop.login1.Manager "$2" b false 2>&1) && exit 0
case "$out" in
  # Without delay locks the node can stop its bus before logind's answer gets out: the call
  # was taken, and the shutdown is under way.
  *"reset by peer"*|*"disconnected"*|*"not connected"*|*"Broken pipe"*) exit 0 ;;
esac
echo "ct-power.sh: $out" >&2
exit 1

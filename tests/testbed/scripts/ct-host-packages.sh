#!/bin/bash
# Installs the Debian packages the bed's logind needs on the machine itself, if missing:
# capsh (libcap2-bin), unshare/nsenter/setpriv (util-linux), mount, dbus-daemon (elogind's
# private bus), dbus-monitor (dbus-bin), and debootstrap's helpers. Never systemd or dbus
# replacements: elogind and debootstrap are only unpacked (fetch-elogind.sh, build-rootfs.sh).
# busctl and systemd-inhibit come from the machine's own systemd package, which must already be
# there (it is on Debian machines, also without systemd running as PID 1).
set -euo pipefail
want="libcap2-bin util-linux mount dbus-daemon dbus-bin ca-certificates wget perl-base gpgv debian-archive-keyring"
missing=""
for p in $want; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "installing:$missing"
  apt-get update >/dev/null
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing >/dev/null
fi
for tool in busctl systemd-inhibit; do
  command -v "$tool" >/dev/null || {
    echo "ct-host-packages.sh: $tool missing (from the machine's systemd package); not installing systemd here" >&2
    exit 1
  }
done
echo "host packages for the logind bed: present"

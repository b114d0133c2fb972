#!/usr/bin/env bash
# Installs and builds everything the bed needs, idempotently: Debian tools, the control-plane
# binaries and helm and promtool (Go, pinned), the Debian root filesystems for the logind
# containers (trixie, bookworm, bullseye, trixie with polkitd), and elogind.
# A second run is a no-op apart from a few stamp checks.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
start=$(date +%s)

"$here/ct-host-packages.sh"
"$here/build-control-plane.sh"
"$here/build-ops-tools.sh"
"$here/fetch-elogind.sh"
"$here/build-rootfs.sh" trixie
if [ "${TESTBED_SKIP_BOOKWORM:-0}" != 1 ]; then
  "$here/build-rootfs.sh" bookworm
fi
# systemd 247, whose legacy `reboot` run by root goes around logind (`check` warns of it).
if [ "${TESTBED_SKIP_BULLSEYE:-0}" != 1 ]; then
  "$here/build-rootfs.sh" bullseye
fi
# A node with polkitd, for the non-root lock holder.
if [ "${TESTBED_SKIP_POLKIT:-0}" != 1 ]; then
  "$here/build-rootfs.sh" trixie-polkit
fi
echo "setup: done in $(( $(date +%s) - start )) s"

#!/usr/bin/env bash
# Installs and builds everything the bed needs, idempotently: Debian tools, the control-plane
# binaries (Go, pinned), the Debian root filesystems for the logind containers, and elogind.
# A second run is a no-op apart from a few stamp checks.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
start=$(date +%s)

need=()
for tool in capsh:libcap2-bin unshare:util-linux nsenter:util-linux dbus-daemon:dbus \
            ip:iproute2 dpkg-deb:dpkg xz:xz-utils zstd:zstd musl-gcc:musl-tools; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

"$here/build-control-plane.sh"
"$here/fetch-elogind.sh"
"$here/build-rootfs.sh" trixie
if [ "${TESTBED_SKIP_BOOKWORM:-0}" != 1 ]; then
  "$here/build-rootfs.sh" bookworm
fi
echo "setup: done in $(( $(date +%s) - start )) s"

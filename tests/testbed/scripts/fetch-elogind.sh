#!/bin/bash
# Unpack elogind 246 (and the libraries it needs that the machine lacks) into
# ${TESTBED_CACHE:-<workspace>/target/testbed}/elogind, for src/logind/elogind.rs.
#
# `apt-get install elogind` would remove the machine's systemd, so the packages are only
# downloaded and unpacked with `dpkg -x`; nothing is installed. Idempotent (stamp file).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${TESTBED_CACHE:-$(cd "$here/../../.." && pwd)/target/testbed}
dest=$cache/elogind
stamp=$dest.stamp
recipe="v1 elogind libelogind0"

mkdir -p "$cache"
exec 9>"$dest.lock"
flock 9
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$recipe" ] && [ -x "$dest/lib/elogind/elogind" ]; then
  echo "elogind: cached at $dest"
  exit 0
fi

# Runtime libraries of elogind that are unpacked too when the machine does not have them.
libs="libacl1 libcap2 libpam0g libselinux1 libudev1"
want="elogind libelogind0"
for p in $libs; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || want="$want $p"
done

tmp=$(mktemp -d); chmod 755 "$tmp"   # apt hands the download to user _apt
trap 'rm -rf "$tmp"' EXIT
# shellcheck disable=SC2086
(cd "$tmp" && apt-get download $want >/dev/null 2>&1) || {
  apt-get update >/dev/null
  (cd "$tmp" && apt-get download $want >/dev/null)
}
rm -rf "$dest"; mkdir -p "$dest"
for deb in "$tmp"/*.deb; do dpkg -x "$deb" "$dest"; done
echo "$recipe" > "$stamp"
echo "elogind: unpacked $want into $dest"

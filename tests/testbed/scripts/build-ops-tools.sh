#!/usr/bin/env bash
# Builds the operators' tools the shipping tests run, helm and promtool, from the Go module proxy
# into ${TESTBED_CACHE:-<repo>/target/testbed}/bin, next to the control plane's binaries.
#
# Only the first run pays: a stamp records the pinned versions and this script's hash, so a second
# run returns at once and a version bump rebuilds.
#
# Environment: GO (default: go on PATH, else /usr/local/go/bin/go), TESTBED_CACHE, HELM_VERSION,
# PROMETHEUS_VERSION (a Prometheus release, e.g. 3.16.0; its Go module is v0.<major><minor>.<patch>).
set -euo pipefail

HELM_VERSION="${HELM_VERSION:-v4.3.1}"
PROMETHEUS_VERSION="${PROMETHEUS_VERSION:-3.16.0}"
BINARIES=(helm promtool)

start=$(date +%s.%N)
elapsed() { awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }'; }

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$script_dir/../../.." && pwd)"
cache="${TESTBED_CACHE:-$repo_root/target/testbed}"
bin="$cache/bin"
src="$cache/go-src/ops-tools"
stamp="$bin/.ops-tools.stamp"
want_stamp="helm=$HELM_VERSION prometheus=$PROMETHEUS_VERSION script=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"

have_all() {
    local b
    for b in "${BINARIES[@]}"; do
        [[ -x "$bin/$b" ]] || return 1
    done
}

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want_stamp" ]] && have_all; then
    echo "ops tools: up to date in $bin ($want_stamp, $(elapsed) s)"
    exit 0
fi

GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
[[ -x "$GO" ]] || { echo "ops tools: no Go toolchain (set GO=...)" >&2; exit 1; }
echo "ops tools: building helm $HELM_VERSION and promtool $PROMETHEUS_VERSION with $("$GO" version)"

export CGO_ENABLED=0
export GOTOOLCHAIN=local
export GOFLAGS="-mod=mod -buildvcs=false"

# Prometheus publishes release X.Y.Z as the Go module version v0.XYY.Z (3.16.0 -> v0.316.0).
IFS=. read -r p_major p_minor p_patch <<<"$PROMETHEUS_VERSION"
prom_module_version="v0.${p_major}$(printf '%02d' "$p_minor").${p_patch}"
helm_major="${HELM_VERSION#v}"; helm_major="${helm_major%%.*}"
helm_module="helm.sh/helm/v$helm_major"

mkdir -p "$bin" "$src"
cd "$src"
# One scratch module requiring both tools: the go command resolves one consistent build list,
# so the Kubernetes client libraries both use compile once.
cat >go.mod <<EOF
module testbed.invalid/ops-tools-build

go 1.26.7

require (
	$helm_module $HELM_VERSION
	github.com/prometheus/prometheus $prom_module_version
)
EOF
rm -f go.sum
"$GO" mod download "$helm_module" github.com/prometheus/prometheus

# The version each tool reports comes from link-time variables, as their release builds set them.
"$GO" build -trimpath -o "$bin/helm.new" \
    -ldflags "-s -w -X $helm_module/internal/version.version=$HELM_VERSION -X $helm_module/internal/version.gitTreeState=clean" \
    "$helm_module/cmd/helm"
# remove_all_sd leaves out Prometheus' service-discovery plugins (cloud SDKs), which rule checks
# and rule tests never use: a much smaller build.
"$GO" build -trimpath -tags remove_all_sd -o "$bin/promtool.new" \
    -ldflags "-s -w -X github.com/prometheus/common/version.Version=$PROMETHEUS_VERSION -X github.com/prometheus/common/version.Branch=HEAD" \
    github.com/prometheus/prometheus/cmd/promtool

rm -f "$stamp"
mv -f "$bin/helm.new" "$bin/helm"
mv -f "$bin/promtool.new" "$bin/promtool"
[[ "$("$bin/helm" version --short)" == "$HELM_VERSION"* ]] || {
    echo "ops tools: helm does not report $HELM_VERSION: $("$bin/helm" version --short)" >&2
    exit 1
}
[[ "$("$bin/promtool" --version 2>&1)" == *"version $PROMETHEUS_VERSION"* ]] || {
    echo "ops tools: promtool does not report $PROMETHEUS_VERSION" >&2
    exit 1
}
echo "$want_stamp" >"$stamp"
echo "ops tools: built ${BINARIES[*]} into $bin in $(elapsed) s"

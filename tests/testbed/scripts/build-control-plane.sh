#!/usr/bin/env bash
# Builds the control-plane binaries the bed runs (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl) from the Go module proxy, into ${TESTBED_CACHE:-<repo>/target/testbed}/bin.
#
# Only the first run pays: a stamp records the pinned versions, so a second run returns at once and a
# version bump rebuilds. When KUBEBUILDER_ASSETS names a folder that already holds every binary (the
# envtest convention), nothing is built.
#
# Environment: GO (default: go on PATH, else /usr/local/go/bin/go), TESTBED_CACHE, KUBEBUILDER_ASSETS,
# K8S_VERSION, ETCD_VERSION.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.36.3}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl)

start=$(date +%s.%N)
elapsed() { awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }'; }

have_all() {
    local dir="$1" b
    for b in "${BINARIES[@]}"; do
        [[ -x "$dir/$b" ]] || return 1
    done
}

if [[ -n "${KUBEBUILDER_ASSETS:-}" ]] && have_all "$KUBEBUILDER_ASSETS"; then
    echo "control plane: using KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS (nothing to build, $(elapsed) s)"
    exit 0
fi

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$script_dir/../../.." && pwd)"
cache="${TESTBED_CACHE:-$repo_root/target/testbed}"
bin="$cache/bin"
src="$cache/go-src"
stamp="$bin/.control-plane.stamp"
# The script's own hash is part of the stamp, so changing build flags here also rebuilds.
want_stamp="k8s=$K8S_VERSION etcd=$ETCD_VERSION script=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want_stamp" ]] && have_all "$bin"; then
    echo "control plane: up to date in $bin ($want_stamp, $(elapsed) s)"
    exit 0
fi

GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
[[ -x "$GO" ]] || { echo "control plane: no Go toolchain (set GO=...)" >&2; exit 1; }
echo "control plane: building k8s $K8S_VERSION and etcd $ETCD_VERSION with $("$GO" version)"

export CGO_ENABLED=0
# The pinned modules declare `go 1.26.0`; never let the go command fetch another toolchain.
export GOTOOLCHAIN=local
# Resolve requirements and write go.sum as needed inside the scratch modules.
export GOFLAGS="-mod=mod -buildvcs=false"

mkdir -p "$bin" "$src/etcd" "$src/k8s"

# The two builds run as background jobs, each in its own process group (job control), so an
# interrupted or failed run can stop both builds and every compiler they started.
set -m
build_pids=()
stop_builds() {
    local p
    for p in "${build_pids[@]}"; do
        kill -- "-$p" 2>/dev/null || true
    done
}
trap 'stop_builds' EXIT
trap 'stop_builds; exit 130' INT TERM

# --- etcd: the server module's root package is etcd's main (main.go calls etcdmain.Main).
cat >"$src/etcd/go.mod" <<EOF
module testbed.invalid/etcd-build

go 1.26.0

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
EOF
rm -f "$src/etcd/go.sum"
(
    cd "$src/etcd"
    "$GO" mod download go.etcd.io/etcd/server/v3
    "$GO" build -trimpath -ldflags "-s -w" -o "$bin/etcd.new" go.etcd.io/etcd/server/v3
) &
etcd_pid=$!
build_pids+=("$etcd_pid")

# --- Kubernetes: k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces them with
# ./staging/src/...; a dependent module must replace them with the published v0.<minor>.<patch> tags.
staging_version="v0.${K8S_VERSION#v1.}"
(
    cd "$src/k8s"
    printf 'module testbed.invalid/k8s-build\n\ngo 1.26.0\n\nrequire k8s.io/kubernetes %s\n' "$K8S_VERSION" >go.mod
    rm -f go.sum
    k8s_mod="$("$GO" mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')"
    [[ -f "$k8s_mod" ]] || { echo "control plane: cannot download k8s.io/kubernetes@$K8S_VERSION" >&2; exit 1; }
    {
        echo
        echo "replace ("
        # Lines like `k8s.io/api => ./staging/src/k8s.io/api` become `k8s.io/api => k8s.io/api v0.36.3`.
        sed -n 's#^[[:space:]]*\(k8s\.io/[A-Za-z0-9._-]*\) => \./staging/src/.*$#\t\1 => \1 '"$staging_version"'#p' "$k8s_mod"
        echo ")"
    } >>go.mod
    grep -q '=> k8s.io/api ' go.mod || { echo "control plane: found no staging replaces in $k8s_mod" >&2; exit 1; }

    major="${K8S_VERSION#v}"; major="${major%%.*}"
    minor="${K8S_VERSION#v*.}"; minor="${minor%%.*}"
    build_date="$(date -u -d "@${SOURCE_DATE_EPOCH:-0}" +%Y-%m-%dT%H:%M:%SZ)"
    ldflags="-s -w"
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
        ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date"
    done
    rm -rf out && mkdir out
    # One go build for all four commands, so shared packages compile once.
    "$GO" build -trimpath -ldflags "$ldflags" -o out/ \
        k8s.io/kubernetes/cmd/kube-apiserver \
        k8s.io/kubernetes/cmd/kube-controller-manager \
        k8s.io/kubernetes/cmd/kube-scheduler \
        k8s.io/kubernetes/cmd/kubectl
) &
k8s_pid=$!
build_pids+=("$k8s_pid")

status=0
wait "$etcd_pid" || { echo "control plane: etcd build failed" >&2; status=1; }
wait "$k8s_pid" || { echo "control plane: kubernetes build failed" >&2; status=1; }
[[ $status -eq 0 ]] || exit "$status"
build_pids=()

# Binaries are replaced only now, after both builds succeeded; the stamp goes first so an
# interrupted swap is rebuilt next time.
rm -f "$stamp"
mv -f "$bin/etcd.new" "$bin/etcd"
for b in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    mv -f "$src/k8s/out/$b" "$bin/$b"
done
[[ "$("$bin/kubectl" version --client)" == *"Client Version: $K8S_VERSION"* ]] || {
    echo "control plane: kubectl does not report $K8S_VERSION" >&2
    exit 1
}
echo "$want_stamp" >"$stamp"
echo "control plane: built ${BINARIES[*]} into $bin in $(elapsed) s"

#!/usr/bin/env bash
# Builds the shutdown-guard image with Debian's buildah from a static binary built here (the
# Dockerfile's `prebuilt` target: no base image to pull, no daemon), then runs it and checks that
# it answers --version, refuses a bad setting with exit 2, starts (its /healthz answers) and,
# given a logind's bus, holds a delay lock there. Prints the image's size.
#
#   scripts/image.sh [--bus-dir DIR [--pid-ns-of PID]]
#
#   --bus-dir DIR     a folder with a logind's system_bus_socket (a node's /run/dbus): the agent in
#                     the image gets it mounted at /run/dbus and must take its lock (tests/image.rs
#                     gives it an elogind of the test bed).
#   --pid-ns-of PID   run the agent's container inside PID's PID namespace. logind looks up the
#                     process that asks for a lock, so it must see the container's PIDs: on a node
#                     it runs in the host's namespace and sees every pod's; the bed's logind runs in
#                     a namespace of its own, given here.
#
# Environment: CARGO_TARGET_DIR; BINARY (a static binary to use instead of building one);
# IMAGE_STORAGE (buildah's storage, default ${TESTBED_CACHE:-target/testbed}/buildah); IMAGE
# (default localhost/shutdown-guard:<version>).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
start=$(date +%s)
bus_dir=""
pid_ns=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --bus-dir) bus_dir="$2"; shift 2 ;;
        --pid-ns-of) pid_ns=(nsenter --target "$2" --pid --); shift 2 ;;
        *) echo "image.sh: unknown argument $1 (usage: scripts/image.sh [--bus-dir DIR [--pid-ns-of PID]])" >&2; exit 2 ;;
    esac
done
command -v buildah >/dev/null || {
    echo "image.sh: buildah is not installed: apt-get install --no-install-recommends buildah (Debian's; it replaces neither systemd nor dbus)" >&2
    exit 1
}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
image="${IMAGE:-localhost/shutdown-guard:$version}"
storage="${IMAGE_STORAGE:-${TESTBED_CACHE:-$here/target/testbed}/buildah}"
mkdir -p "$storage/root" "$storage/run"
ba=(buildah --root "$storage/root" --runroot "$storage/run" --storage-driver vfs)

# --- The binary: static, since the image has no dynamic loader (glibc's static PIE; the
# Dockerfile's own build stage makes a musl one).
if [[ -z "${BINARY:-}" ]]; then
    target_dir="${CARGO_TARGET_DIR:-$here/target}"
    echo "image: building a static binary (release profile, crt-static)"
    RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked \
        --target x86_64-unknown-linux-gnu -p shutdown-guard --bin shutdown-guard
    BINARY="$target_dir/x86_64-unknown-linux-gnu/release/shutdown-guard"
fi
file -L "$BINARY" | grep -q "static" || {
    echo "image.sh: $BINARY is not statically linked; the image has no loader" >&2
    exit 1
}

ctx=$(mktemp -d)
ctr=""
agent_pid=""
cleanup() {
    [[ -n "$agent_pid" ]] && kill -- "-$agent_pid" 2>/dev/null || true
    [[ -n "$ctr" ]] && "${ba[@]}" rm "$ctr" >/dev/null 2>&1 || true
    rm -rf "$ctx"
}
trap cleanup EXIT
cp "$BINARY" "$ctx/shutdown-guard"
built=$(date +%s)
"${ba[@]}" bud --isolation chroot --target prebuilt --build-arg BINARY=shutdown-guard \
    --build-arg VERSION="$version" --build-arg REVISION="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    -f Dockerfile -t "$image" "$ctx" >"$ctx/build.log" 2>&1 || {
    cat "$ctx/build.log" >&2
    exit 1
}
"${ba[@]}" rmi --prune >/dev/null 2>&1 || true
echo "image: built $image in $(( $(date +%s) - built )) s"
"${ba[@]}" images --format '{{.Name}}:{{.Tag}} {{.Size}}' | grep "^$image " | sed 's/^/image: size /'
"${ba[@]}" inspect --format '{{.OCIv1.Config.Entrypoint}} {{.OCIv1.Config.Cmd}} user={{.OCIv1.Config.User}}{{"\n"}}' "$image" | sed 's/^/image: entrypoint, command, user: /'

ctr=$("${ba[@]}" from "$image")
run() { "${ba[@]}" run --isolation chroot "$@"; }

# --version
out=$(run "$ctr" -- /usr/local/bin/shutdown-guard --version)
[[ "$out" == "shutdown-guard $version" ]] || { echo "image.sh: --version says: $out" >&2; exit 1; }
echo "image: check --version: $out"

# A bad setting: exit 2 and a message naming it.
set +e
err=$(run -e SHUTDOWN_GUARD_DRAIN_BUDGET=soon "$ctr" -- /usr/local/bin/shutdown-guard run --node node-x 2>&1)
code=$?
set -e
[[ $code -eq 2 && "$err" == *"drain_budget = \"soon\""* ]] || {
    echo "image.sh: a bad drain_budget gave exit $code: $err" >&2
    exit 1
}
echo "image: check bad setting: exit 2: $(echo "$err" | head -1)"

# Starts: the admin server answers while the agent waits for logind.
port=$(( 20000 + RANDOM % 20000 ))
kubeconfig="$ctx/kubeconfig"
# An API server that is not there, with a CA of its own: the image has no system CA store, as
# in a pod, where the ServiceAccount's ca.crt is used.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
    -subj /CN=none -keyout "$ctx/ca.key" -out "$ctx/ca.crt" >/dev/null 2>&1
ca=$(base64 -w0 <"$ctx/ca.crt")
cat >"$kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: none, cluster: {server: "https://127.0.0.1:9", certificate-authority-data: "$ca"}}]
users: [{name: none, user: {token: none}}]
contexts: [{name: none, context: {cluster: none, user: none}}]
current-context: none
EOF
mounts=(-v "$kubeconfig:/etc/shutdown-guard/kubeconfig:ro")
if [[ -n "$bus_dir" ]]; then
    mounts+=(-v "$bus_dir:/run/dbus:ro" -e DBUS_SYSTEM_BUS_ADDRESS=unix:path=/run/dbus/system_bus_socket)
else
    mounts+=(-e DBUS_SYSTEM_BUS_ADDRESS=unix:path=/nonexistent)
fi
# Its own session and process group, so that stopping it reaches buildah's children whatever
# nsenter does with signals.
setsid "${pid_ns[@]}" "${ba[@]}" run --isolation chroot "${mounts[@]}" "$ctr" -- /usr/local/bin/shutdown-guard run --node node-x \
    --kubeconfig /etc/shutdown-guard/kubeconfig --listen-address "127.0.0.1:$port" >"$ctx/agent.log" 2>&1 &
agent_pid=$!
healthz() {
    exec 3<>"/dev/tcp/127.0.0.1/$port" || return 1
    printf 'GET /healthz HTTP/1.0\r\n\r\n' >&3
    head -1 <&3 | grep -q " 200 "
}
for _ in $(seq 100); do
    healthz 2>/dev/null && break
    sleep 0.1
done
healthz 2>/dev/null || { echo "image.sh: /healthz never answered; agent log:" >&2; cat "$ctx/agent.log" >&2; exit 1; }
echo "image: check start: /healthz answers on 127.0.0.1:$port"

if [[ -n "$bus_dir" ]]; then
    locked=""
    for _ in $(seq 100); do
        if busctl --address="unix:path=$bus_dir/system_bus_socket" call org.freedesktop.login1 \
            /org/freedesktop/login1 org.freedesktop.login1.Manager ListInhibitors 2>/dev/null |
            grep -q '"shutdown-guard"'; then
            locked=yes
            break
        fi
        sleep 0.1
    done
    [[ -n "$locked" ]] || { echo "image.sh: no lock on the bus; agent log:" >&2; cat "$ctx/agent.log" >&2; exit 1; }
    echo "image: check lock: logind lists shutdown-guard's delay lock"
fi
kill -- "-$agent_pid" 2>/dev/null || true
wait "$agent_pid" 2>/dev/null || true
agent_pid=""
echo "image: all checks passed in $(( $(date +%s) - start )) s"

#!/bin/bash
# Blocks until a node's console log (written by src/logind/systemd.rs, one
# "<unix seconds.nanos> <line>" per line) shows systemd's "Shutting down." after its first
# SKIP lines (earlier boots), then prints that moment. Gives up after
# ${TESTBED_WAIT_TIMEOUT:-600} seconds (exit 1).
# Usage: ct-wait-poweroff.sh CONSOLE_LOG [SKIP]
set -euo pipefail
log=${1:?console log}; skip=${2:-0}
deadline=$(( $(date +%s) + ${TESTBED_WAIT_TIMEOUT:-600} ))
while :; do
  if at=$(tail -n +"$((skip + 1))" "$log" 2>/dev/null | sed -n 's/^\([0-9.]*\) Shutting down\.$/\1/p' | head -n1) && [ -n "$at" ]; then
    echo "$at"
    exit 0
  fi
  [ "$(date +%s)" -lt "$deadline" ] || { echo "ct-wait-poweroff.sh: no power-off within the timeout" >&2; exit 1; }
  sleep 0.05
done

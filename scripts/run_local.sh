#!/usr/bin/env bash
# Run this app with `flwr run . --stream` on Flower's local simulation SuperLink,
# then stop that SuperLink if this script started it (Flower leaves it running).
# Extra arguments go to `flwr run`, e.g.:
#   scripts/run_local.sh --run-config 'overrides="num_rounds=5"'
set -u
cd "$(dirname "$0")/.."
# Dependencies come from this environment; no per-run `uv sync` (it would fetch CUDA torch).
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED="${FLWR_TELEMETRY_ENABLED:-0}"

superlinks() { pgrep -f 'flower-superlink .*--simulation' | sort; }
alive() { local state; state=$(ps -o stat= -p "$1" 2>/dev/null); [ -n "$state" ] && [[ $state != Z* ]]; }
before=$(superlinks)
log=$(mktemp)
stop_started() {
  for pid in $(superlinks); do
    if ! grep -qx "$pid" <<<"$before"; then
      kill "$pid" 2>/dev/null || continue
      # Wait (up to 20 s) for it to shut down its SuperExec and simulation.
      for _ in $(seq 40); do alive "$pid" || break; sleep 0.5; done
      alive "$pid" && kill -9 "$pid"
      echo "Stopped the local SuperLink this run started (PID $pid)."
    fi
  done
}
# Also on Ctrl-C or SIGTERM: the SuperLink this script started never outlives it.
trap 'rm -f "$log"; stop_started' EXIT
trap 'exit 130' INT TERM
flwr run . --stream "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
# `flwr run --stream` exits 0 even when the run fails; the server's last line tells.
if [ "$status" -eq 0 ] && ! grep -q '\[fedllm-flwr\] done in' "$log"; then
  echo "The run did not complete (see the log above, or 'flwr ls')." >&2
  status=1
fi
exit $status

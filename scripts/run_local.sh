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
before=$(superlinks)
flwr run . --stream "$@"
status=$?
for pid in $(superlinks); do
  if ! grep -qx "$pid" <<<"$before"; then
    kill "$pid" 2>/dev/null && echo "Stopped the local SuperLink this run started (PID $pid)."
  fi
done
exit $status

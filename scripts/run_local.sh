#!/usr/bin/env bash
# Run this app with `flwr run . --stream` on Flower's local simulation SuperLink,
# then stop that SuperLink if this invocation started it (Flower leaves it running).
# Only that one: a SuperLink another run or test started meanwhile is left alone.
# Extra arguments go to `flwr run`, e.g.:
#   scripts/run_local.sh --run-config 'overrides="num_rounds=5"'
set -u
cd "$(dirname "$0")/.."
# Dependencies come from this environment; no per-run `uv sync` (it would fetch CUDA torch).
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED="${FLWR_TELEMETRY_ENABLED:-0}"

# `flwr` starts the SuperLink with a copy of its own environment, so the one this
# invocation started carries this marker; none other does.
export FEDLLM_FLWR_RUN_LOCAL="$$-$(date +%s%N)"
superlinks() { pgrep -f 'flower-superlink .*--simulation' | sort; }
ours() {
  local pid
  for pid in $(superlinks); do
    tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qx "FEDLLM_FLWR_RUN_LOCAL=$FEDLLM_FLWR_RUN_LOCAL" && echo "$pid"
  done
}
alive() { local state; state=$(ps -o stat= -p "$1" 2>/dev/null); [ -n "$state" ] && [[ $state != Z* ]]; }
# Process groups under PID (the SuperLink runs each simulation in a session of its own).
groups_below() {
  local todo=("$1") pid child groups=""
  while [ ${#todo[@]} -gt 0 ]; do
    pid=${todo[0]}; todo=("${todo[@]:1}")
    groups+="$(ps -o pgid= -p "$pid" 2>/dev/null) "
    for child in $(ps -o pid= --ppid "$pid" 2>/dev/null); do todo+=("$child"); done
  done
  tr ' ' '\n' <<<"$groups" | grep -v '^$' | sort -u
}
stop_started() {
  local own_group pid group groups
  own_group=$(ps -o pgid= -p $$ | tr -d ' ')
  for pid in $(ours); do
    groups=$(groups_below "$pid")
    kill "$pid" 2>/dev/null || continue
    # Wait (up to 20 s) for it to shut down its SuperExec and simulation.
    for _ in $(seq 40); do alive "$pid" || break; sleep 0.5; done
    alive "$pid" && kill -9 "$pid"
    # A run stopped mid-way leaves its simulation (and Ray) behind: stop those groups too.
    for group in $groups; do
      [ "$group" = "$own_group" ] || kill -- -"$group" 2>/dev/null
    done
    echo "Stopped the local SuperLink this run started (PID $pid)."
  done
}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"; stop_started' EXIT
# On Ctrl-C or SIGTERM, stop streaming, then the EXIT trap stops the SuperLink.
trap '[ -s "$tmp/pid" ] && kill "$(cat "$tmp/pid")" 2>/dev/null; exit 130' INT TERM
# In the background, so that a signal interrupts `wait` instead of waiting for flwr;
# waiting for `tee` means the log is complete when it is read below.
(
  flwr run . --stream "$@" &
  echo $! >"$tmp/pid"
  wait $!
  { echo $? >"$tmp/status"; } 2>/dev/null  # $tmp is gone if interrupted
) 2>&1 | tee "$tmp/log" &
wait $!
status=$(cat "$tmp/status" 2>/dev/null || echo 1)
# `flwr run --stream` exits 0 even when the run fails; the server's last line tells.
if [ "$status" -eq 0 ] && ! grep -q '\[fedllm-flwr\] done in' "$tmp/log"; then
  echo "The run did not complete (see the log above, or 'flwr ls')." >&2
  status=1
fi
exit "$status"

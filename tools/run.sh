#!/usr/bin/env bash
# Start mqtt-pingpong under supervisord and stream the three logs, each line marked with its
# process; Ctrl-C stops everything and waits until no process is left and the port is free.
#   tools/run.sh               start (if not running), stream logs, stop on Ctrl-C
#   tools/run.sh --start-only  start and return
#   tools/run.sh --stop        stop and wait
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=.venv/bin
# make cluster runs this script on its own configuration (CONF, PIDFILE and LOGS set).
CONF=${CONF:-supervisord.conf}
PIDFILE=${PIDFILE:-run/supervisord.pid}
read -r -a LOGS <<< "${LOGS:-logs/broker.log logs/echo_client.log logs/ping_client.log}"

running() {
  [[ -f $PIDFILE ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null
}

# The live page's address, first: the broker's WebSocket port in the configuration, if any.
live_page() {
  local ws
  ws=${MQTT_WS_PORT:-$(grep -o 'MQTT_WS_PORT:-[0-9]*' "$CONF" | grep -o '[0-9][0-9]*' | head -n 1 || true)}
  [[ -n $ws ]] && echo "Live page: http://127.0.0.1:$ws/ (MQTT over WebSockets at ws://127.0.0.1:$ws/mqtt)"
  return 0
}

start() {
  live_page
  mkdir -p logs run "$(dirname "${LOGS[0]}")"
  if running; then
    echo "supervisord is already running (pid $(cat "$PIDFILE")); attaching to its logs."
    return
  fi
  rm -f "$(dirname "$PIDFILE")/sv.sock"
  "$BIN/supervisord" -c "$CONF"
  # supervisord daemonizes: its pidfile appears a moment after the command returns.
  for _ in $(seq 1 100); do
    running && break
    sleep 0.1
  done
  if ! running; then
    echo "supervisord did not start; see $(dirname "${LOGS[0]}")/supervisord.log" >&2
    exit 1
  fi
  echo "Started supervisord (pid $(cat "$PIDFILE")). Logs are in $(dirname "${LOGS[0]}")/."
}

stop() {
  if ! running; then
    [ "${1:-}" = quiet ] || echo "Not running."
    return 0
  fi
  local pid
  pid=$(cat "$PIDFILE")
  "$BIN/supervisorctl" -c "$CONF" shutdown >/dev/null 2>&1 || kill -TERM "$pid" 2>/dev/null || true
  # supervisord exits after its children; each child stops within its stopwaitsecs (5 s).
  for _ in $(seq 1 150); do
    kill -0 "$pid" 2>/dev/null || { echo "Stopped."; return 0; }
    sleep 0.1
  done
  echo "supervisord (pid $pid) did not stop within 15 s; killing its process group." >&2
  kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
}

case "${1:-}" in
  --start-only) start; exit 0 ;;
  --stop) stop; exit 0 ;;
  "") ;;
  *) echo "usage: $0 [--start-only|--stop]" >&2; exit 64 ;;
esac

# Stop everything however the terminal goes away: Ctrl-C (INT), closing it (HUP), a pipe reader
# that died (`make run | tee x` then Ctrl-C: writes fail), or the stream ending (EXIT). Once
# stopping, further signals are ignored so that the stop itself is never cut short, and its
# messages are best effort: the terminal or pipe they go to may be gone.
on_exit() {
  trap '' INT TERM HUP PIPE
  trap - EXIT
  set +e
  { echo; echo "Stopping..."; } 2>/dev/null
  stop quiet 2>/dev/null
  probe_report 2>/dev/null
  exit "$probe_code"
}

# Like ping(8) when interrupted: the ping client's statistics on the terminal (its last run's
# summary, which it writes to its log when supervisord stops it), and its exit status as ours:
# 0 every ping answered, 1 some lost, 2 never connected.
probe_code=0
probe_report() {
  local log="" file code
  for file in "${LOGS[@]}"; do
    [[ $file == *ping_client.log ]] && log=$file
  done
  [[ -n $log && -s $log ]] || return 0
  echo
  awk '/ ping statistics ---$/ { text = ""; keep = 1 } keep { text = text $0 "\n" }
       END { printf "%s", text }' "$log"
  code=$(grep -o 'stopped: ping_client (exit status [0-9]*)' "$(dirname "$log")/supervisord.log" \
    | tail -n 1 | grep -o '[0-9]*' | tail -n 1)
  [[ -n $code ]] && probe_code=$code
  return 0
}

start
touch "${LOGS[@]}"
trap on_exit INT TERM HUP PIPE EXIT
# tail names each file in a "==> file <==" header; turn that into a per-line prefix. (A bash
# loop, because mawk buffers its input and would hold lines back.) A failed write (the reader
# is gone) ends the loop, and with it the stream.
tail -n 0 -F "${LOGS[@]}" 2>/dev/null | {
  name=""
  while IFS= read -r line; do
    if [[ $line =~ ^==\>\ .*/([^/]*)\.log\ \<==$ ]]; then
      name=${BASH_REMATCH[1]}
    elif [[ -n $line ]]; then
      printf '%-12s| %s\n' "$name" "$line" 2>/dev/null || exit 0
    fi
  done
} || true

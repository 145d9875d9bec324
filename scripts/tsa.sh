#!/usr/bin/env bash
# Starts / stops a real RFC 3161 time-stamp authority on 127.0.0.1 for the tests
# (tests/tsa/tsa_server.py: `openssl ts -reply` behind a small HTTP handler,
# with its own test CA and a test-control API).
#   scripts/tsa.sh start STATE_DIR   → writes STATE_DIR/tsa.env
#   scripts/tsa.sh stop STATE_DIR
# Needs: python3, openssl.
set -euo pipefail
cmd=${1:?usage: tsa.sh start|stop STATE_DIR}
state=${2:?usage: tsa.sh start|stop STATE_DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$state"
state=$(cd "$state" && pwd)
pidfile=$state/tsa.pid
dir=$state/tsa
case $cmd in
  start)
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then echo "tsa: already running"; exit 0; fi
    rm -rf "$dir"; mkdir -p "$dir"
    python3 "$root/tests/tsa/tsa_server.py" --state-dir "$dir" >"$state/tsa.log" 2>&1 &
    echo $! > "$pidfile"
    for _ in $(seq 150); do
      [ -f "$dir/port" ] && break
      kill -0 "$(cat "$pidfile")" 2>/dev/null || break
      sleep 0.1
    done
    port=$(cat "$dir/port" 2>/dev/null || true)
    if [ -z "$port" ] || ! curl -s -o /dev/null -X POST -d '{}' "http://127.0.0.1:$port/control/stats"; then
      echo "tsa did not start:" >&2; tail -20 "$state/tsa.log" >&2; exit 1
    fi
    # One real round trip, checked with openssl itself.
    printf 'keybroker tsa.sh self-test' > "$dir/selftest.dat"
    openssl ts -query -data "$dir/selftest.dat" -sha256 -cert -out "$dir/selftest.tsq" 2>/dev/null
    curl -sf -H 'Content-Type: application/timestamp-query' --data-binary "@$dir/selftest.tsq" \
      -o "$dir/selftest.tsr" "http://127.0.0.1:$port/"
    openssl ts -verify -data "$dir/selftest.dat" -in "$dir/selftest.tsr" -CAfile "$dir/root.pem" \
      -untrusted "$dir/tsa.pem" >/dev/null 2>&1 \
      || { echo "tsa: its own reply does not verify:" >&2; tail -20 "$state/tsa.log" >&2; exit 1; }
    cat > "$state/tsa.env" <<ENV
export KEYBROKER_TEST_TSA_URL=http://127.0.0.1:$port/
export KEYBROKER_TEST_TSA_CHAIN=$dir/chain.pem
export KEYBROKER_TEST_TSA_DIR=$dir
ENV
    echo "tsa: http://127.0.0.1:$port/ (chain $dir/chain.pem)"
    ;;
  stop)
    [ -f "$pidfile" ] || exit 0
    pid=$(cat "$pidfile")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    rm -f "$pidfile"
    ;;
  *) echo "usage: tsa.sh start|stop STATE_DIR" >&2; exit 2 ;;
esac

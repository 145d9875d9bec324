#!/usr/bin/env bash
# Starts / stops moto's KMS server on 127.0.0.1 (AWS KMS stand-in, with its
# MessageType=DIGEST defect corrected by tests/aws/moto_kms_server.py).
#   scripts/moto.sh start STATE_DIR   → writes STATE_DIR/moto.env
#   scripts/moto.sh stop STATE_DIR
set -euo pipefail
cmd=${1:?usage: moto.sh start|stop STATE_DIR}
state=${2:?usage: moto.sh start|stop STATE_DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$state"
pidfile=$state/moto.pid
case $cmd in
  start)
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then echo "moto: already running"; exit 0; fi
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    python3 "$root/tests/aws/moto_kms_server.py" "$port" >"$state/moto.log" 2>&1 &
    echo $! > "$pidfile"
    for _ in $(seq 150); do
      curl -s -o /dev/null "http://127.0.0.1:$port/moto-api/" && break
      sleep 0.1
    done
    curl -s -o /dev/null "http://127.0.0.1:$port/moto-api/" || { echo "moto did not start:" >&2; tail -20 "$state/moto.log" >&2; exit 1; }
    # moto accepts any credentials; these keep the AWS chain from looking further.
    cat > "$state/moto.env" <<ENV
export KEYBROKER_TEST_AWS_ENDPOINT=127.0.0.1:$port
export AWS_ACCESS_KEY_ID=keybroker-test AWS_SECRET_ACCESS_KEY=keybroker-test AWS_REGION=us-east-1
export AWS_EC2_METADATA_DISABLED=true
ENV
    echo "moto: http://127.0.0.1:$port (KMS)"
    ;;
  stop)
    [ -f "$pidfile" ] || exit 0
    kill -TERM "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
    ;;
  *) echo "usage: moto.sh start|stop STATE_DIR" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Starts / stops the fake Google Cloud KMS (tests/fakes/gcp_kms.py: gRPC
# google.cloud.kms.v1 plus an OAuth token endpoint and a test-control API, all
# on 127.0.0.1).
#   scripts/gcpkms.sh start STATE_DIR   → writes STATE_DIR/gcpkms.env
#   scripts/gcpkms.sh stop STATE_DIR
# Needs: python3 with grpcio, google-cloud-kms, cryptography.
set -euo pipefail
cmd=${1:?usage: gcpkms.sh start|stop STATE_DIR}
state=${2:?usage: gcpkms.sh start|stop STATE_DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$state"
state=$(cd "$state" && pwd)
pidfile=$state/gcpkms.pid
case $cmd in
  start)
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then echo "gcpkms: already running"; exit 0; fi
    read -r grpc_port http_port < <(python3 -c 'import socket
a=socket.socket(); a.bind(("127.0.0.1",0)); b=socket.socket(); b.bind(("127.0.0.1",0))
print(a.getsockname()[1], b.getsockname()[1])')
    rm -f "$state/service_account.json"
    python3 "$root/tests/fakes/gcp_kms.py" --grpc-port "$grpc_port" --http-port "$http_port" \
      --state-dir "$state" >"$state/gcpkms.log" 2>&1 &
    echo $! > "$pidfile"
    for _ in $(seq 150); do
      [ -f "$state/service_account.json" ] && curl -s -o /dev/null -X POST -d '{}' "http://127.0.0.1:$http_port/control/stats" && break
      sleep 0.1
    done
    curl -s -o /dev/null -X POST -d '{}' "http://127.0.0.1:$http_port/control/stats" \
      || { echo "fake Cloud KMS did not start:" >&2; tail -20 "$state/gcpkms.log" >&2; exit 1; }
    cat > "$state/gcpkms.env" <<ENV
export KEYBROKER_TEST_GCP_KMS_ENDPOINT=http://127.0.0.1:$grpc_port
export KEYBROKER_TEST_GCP_KMS_CONTROL=http://127.0.0.1:$http_port
export KEYBROKER_TEST_GCP_CREDENTIALS=$state/service_account.json
export KEYBROKER_TEST_GCP_DIR=$state
ENV
    echo "gcpkms: grpc http://127.0.0.1:$grpc_port, token/control http://127.0.0.1:$http_port"
    ;;
  stop)
    [ -f "$pidfile" ] || exit 0
    kill -TERM "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
    ;;
  *) echo "usage: gcpkms.sh start|stop STATE_DIR" >&2; exit 2 ;;
esac

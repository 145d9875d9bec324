#!/usr/bin/env bash
# Starts / stops a real OpenBao (Vault's API) dev server on 127.0.0.1 with the
# transit engine enabled, for the Vault provider tests and the benchmark.
#   scripts/openbao.sh start STATE_DIR   → writes STATE_DIR/openbao.env
#   scripts/openbao.sh stop STATE_DIR
# The dev server keeps everything in memory and is unsealed with a root token
# the script chooses; it is never reachable beyond loopback.
set -euo pipefail
cmd=${1:?usage: openbao.sh start|stop STATE_DIR}
state=${2:?usage: openbao.sh start|stop STATE_DIR}
mkdir -p "$state"
pidfile=$state/openbao.pid

case $cmd in
  start)
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then echo "openbao: already running"; exit 0; fi
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    token=root-$(head -c 512 /dev/urandom | tr -dc 'a-z0-9' | head -c 16)
    # Test-only: OpenBao 2 refuses audit devices created through the API unless
    # allowed; the benchmark counts backend calls with OpenBao's own audit log.
    echo 'unsafe_allow_api_audit_creation = true' > "$state/openbao-extra.hcl"
    bao server -dev -dev-root-token-id="$token" -dev-listen-address="127.0.0.1:$port" \
      -config="$state/openbao-extra.hcl" -log-level=warn >"$state/openbao.log" 2>&1 &
    echo $! > "$pidfile"
    export BAO_ADDR=http://127.0.0.1:$port BAO_TOKEN=$token
    for _ in $(seq 100); do
      [ "$(curl -s -o /dev/null -w '%{http_code}' "$BAO_ADDR/v1/sys/health")" = 200 ] && break
      sleep 0.1
    done
    bao secrets enable transit >/dev/null
    cat > "$state/openbao.env" <<ENV
export KEYBROKER_TEST_VAULT_ADDR=$BAO_ADDR
export KEYBROKER_TEST_VAULT_TOKEN=$token
ENV
    echo "openbao: $BAO_ADDR (transit enabled)"
    ;;
  stop)
    [ -f "$pidfile" ] || exit 0
    pid=$(cat "$pidfile")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$pidfile"
    ;;
  *) echo "usage: openbao.sh start|stop STATE_DIR" >&2; exit 2 ;;
esac

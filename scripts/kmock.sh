#!/usr/bin/env bash
# Starts / stops a Kubernetes API stand-in on 127.0.0.1: PyPI kmock, with the
# fixes a kube-rs client needs applied by tests/k8s/kmock_server.py (PUT
# replace, immutable secrets, fieldSelector, watch timeouts, Status reasons).
#   scripts/kmock.sh start STATE_DIR   → writes STATE_DIR/kmock.env and STATE_DIR/kubeconfig
#   scripts/kmock.sh stop STATE_DIR
# Watches end after KMOCK_MAX_WATCH_SECONDS (default 5), so the tests also
# cross the watcher's reconnects.
set -euo pipefail
cmd=${1:?usage: kmock.sh start|stop STATE_DIR}
state=${2:?usage: kmock.sh start|stop STATE_DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$state"
state=$(cd "$state" && pwd)
pidfile=$state/kmock.pid
case $cmd in
  start)
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then echo "kmock: already running"; exit 0; fi
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    python3 "$root/tests/k8s/kmock_server.py" "$port" --max-watch-seconds "${KMOCK_MAX_WATCH_SECONDS:-5}" >"$state/kmock.log" 2>&1 &
    echo $! > "$pidfile"
    for _ in $(seq 150); do
      curl -s -o /dev/null "http://127.0.0.1:$port/version" && break
      sleep 0.1
    done
    curl -s -o /dev/null "http://127.0.0.1:$port/version" || { echo "kmock did not start:" >&2; tail -20 "$state/kmock.log" >&2; exit 1; }
    # kmock checks no credentials; the token only keeps clients from looking further.
    cat > "$state/kubeconfig" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: kmock
  cluster:
    server: http://127.0.0.1:$port
contexts:
- name: kmock
  context:
    cluster: kmock
    user: kmock
    namespace: default
current-context: kmock
users:
- name: kmock
  user:
    token: kmock-test-token
KUBECONFIG
    cat > "$state/kmock.env" <<ENV
export KEYBROKER_TEST_KUBE_API=http://127.0.0.1:$port
export KEYBROKER_TEST_KUBECONFIG=$state/kubeconfig
ENV
    echo "kmock: http://127.0.0.1:$port (Kubernetes API; kubeconfig $state/kubeconfig)"
    ;;
  stop)
    [ -f "$pidfile" ] || exit 0
    kill -TERM "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
    ;;
  *) echo "usage: kmock.sh start|stop STATE_DIR" >&2; exit 2 ;;
esac

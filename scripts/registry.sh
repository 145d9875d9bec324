#!/usr/bin/env bash
# Starts / stops two real OCI registries (Debian's docker-registry, distribution
# 2.8) on 127.0.0.1 for the tests: one anonymous, one with htpasswd (bcrypt) auth.
#   scripts/registry.sh start STATE_DIR   → writes STATE_DIR/registry.env
#   scripts/registry.sh stop STATE_DIR
# Each has its own config and storage under STATE_DIR; the package's own config
# (/etc/docker/registry, port 5000) is never used.
set -euo pipefail
cmd=${1:?usage: registry.sh start|stop STATE_DIR}
state=${2:?usage: registry.sh start|stop STATE_DIR}
mkdir -p "$state"

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

stop_one() {
  local pidfile=$state/$1.pid
  [ -f "$pidfile" ] || return 0
  local pid; pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

start_one() { # name port auth(yes|no)
  local name=$1 port=$2 auth=$3 dir=$state/$1
  mkdir -p "$dir/storage"
  {
    echo "version: 0.1"
    echo "log: {level: warn}"
    echo "storage: {filesystem: {rootdirectory: $dir/storage}, delete: {enabled: true}}"
    echo "http: {addr: 127.0.0.1:$port}"
    if [ "$auth" = yes ]; then
      echo "auth: {htpasswd: {realm: keybroker-test, path: $state/htpasswd}}"
    fi
  } > "$dir/config.yml"
  docker-registry serve "$dir/config.yml" >"$state/$name.log" 2>&1 &
  echo $! > "$state/$name.pid"
}

wait_for() { # name url expected-status
  for _ in $(seq 200); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "$2" || true)
    [ "$code" = "$3" ] && return 0
    sleep 0.1
  done
  echo "registry $1 did not answer $3 on $2; log:" >&2
  tail -20 "$state/$1.log" >&2
  return 1
}

case $cmd in
  start)
    if [ -f "$state/registry.env" ] && [ -f "$state/anon.pid" ] && kill -0 "$(cat "$state/anon.pid")" 2>/dev/null; then
      echo "registry: already running ($state)"; exit 0
    fi
    password=$(head -c 512 /dev/urandom | tr -dc 'A-Za-z0-9' | head -c 20)
    htpasswd -Bbn kbuser "$password" > "$state/htpasswd"
    anon_port=$(free_port); auth_port=$(free_port)
    start_one anon "$anon_port" no
    start_one auth "$auth_port" yes
    wait_for anon "http://127.0.0.1:$anon_port/v2/" 200
    wait_for auth "http://127.0.0.1:$auth_port/v2/" 401
    code=$(curl -s -o /dev/null -w '%{http_code}' -u "kbuser:$password" "http://127.0.0.1:$auth_port/v2/")
    [ "$code" = 200 ] || { echo "registry auth: credentials refused ($code)" >&2; exit 1; }
    cat > "$state/registry.env" <<ENV
export KEYBROKER_TEST_REGISTRY=127.0.0.1:$anon_port
export KEYBROKER_TEST_AUTH_REGISTRY=127.0.0.1:$auth_port
export KEYBROKER_TEST_AUTH_USER=kbuser
export KEYBROKER_TEST_AUTH_PASSWORD=$password
ENV
    echo "registry: anonymous on 127.0.0.1:$anon_port, htpasswd on 127.0.0.1:$auth_port"
    ;;
  stop)
    stop_one anon; stop_one auth
    ;;
  *) echo "usage: registry.sh start|stop STATE_DIR" >&2; exit 2 ;;
esac

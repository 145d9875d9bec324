#!/usr/bin/env bash
# Drives the built binaries the way a user does: keybrokerd on its embedded
# default (no config), keybroker generate-key-pair, sign and verify against a
# real registry. Usage: scripts/smoke.sh REGISTRY_HOST:PORT
set -euo pipefail
registry=${1:?usage: smoke.sh REGISTRY_HOST:PORT}
bin=$(cd "$(dirname "$0")/.." && pwd)/target/debug
work=$(mktemp -d -t keybroker-smoke.XXXXXX)
export XDG_DATA_HOME=$work/data XDG_RUNTIME_DIR=$work/run
mkdir -p "$XDG_RUNTIME_DIR"
unset KEYBROKER_SOCKET
daemon=
trap '[ -n "$daemon" ] && kill "$daemon" 2>/dev/null; rm -rf "$work"' EXIT

"$bin/keybrokerd" 2>"$work/daemon.log" &
daemon=$!
for _ in $(seq 100); do [ -S "$XDG_RUNTIME_DIR/keybroker/keybroker.sock" ] && break; sleep 0.05; done

"$bin/keybroker" keys | grep -q '^dev	ecdsa-p256-sha256'
"$bin/keybroker" public-key --key dev > "$work/dev.pub"

# An image to sign, pushed through the registry API with curl (no docker here).
repo=smoke/app$$
cfg='{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
cfg_digest=sha256:$(printf '%s' "$cfg" | sha256sum | cut -d' ' -f1)
loc=$(curl -fsS -X POST -D - -o /dev/null "http://$registry/v2/$repo/blobs/uploads/" | tr -d '\r' | sed -n 's/^[Ll]ocation: //p')
case $loc in http*) ;; *) loc="http://$registry$loc" ;; esac
sep='?'; case $loc in *\?*) sep='&' ;; esac
curl -fsS -X PUT -H 'Content-Type: application/octet-stream' --data-binary "$cfg" "$loc${sep}digest=$cfg_digest" >/dev/null
manifest='{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","size":'${#cfg}',"digest":"'$cfg_digest'"},"layers":[]}'
curl -fsS -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' --data-binary "$manifest" "http://$registry/v2/$repo/manifests/v1" >/dev/null

"$bin/keybroker" sign "$registry/$repo:v1" --key dev -a commit=smoke
"$bin/keybroker" verify "$registry/$repo:v1" --key "$work/dev.pub" | grep -q '"commit":"smoke"'

# generate-key-pair writes a cosign key the daemon can load.
(cd "$work" && COSIGN_PASSWORD=smoke-pw "$bin/keybroker" generate-key-pair)
grep -q 'BEGIN ENCRYPTED SIGSTORE PRIVATE KEY' "$work/cosign.key"
cat > "$work/gen.toml" <<TOML
[keys.gen]
ref = "$work/cosign.key"
password_env = "GEN_PW"
TOML
GEN_PW=smoke-pw "$bin/keybrokerd" --check-config "$work/gen.toml"
if GEN_PW=wrong "$bin/keybrokerd" --check-config "$work/gen.toml" 2>/dev/null; then
  echo "smoke: a wrong password was accepted" >&2; exit 1
fi

kill -TERM "$daemon"; wait "$daemon"; daemon=
[ ! -e "$XDG_RUNTIME_DIR/keybroker/keybroker.sock" ] || { echo "smoke: socket left behind" >&2; exit 1; }
echo "smoke: ok"

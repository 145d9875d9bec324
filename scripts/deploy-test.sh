#!/usr/bin/env bash
# Exercises everything under deploy/ for real (issue 10), on a fresh Debian
# machine as root, after scripts/install-test-deps.sh and the workspace debug
# build (target/debug/keybrokerd, target/debug/keybroker):
#   systemd     systemd-analyze verify + security --offline on the units,
#               systemd-sysusers on the sysusers entry, the example config
#   activation  keybrokerd under systemd-socket-activate: inherited socket,
#               READY=1 / RELOADING=1 / STOPPING=1 on a test NOTIFY_SOCKET,
#               keybroker sign + verify + health through the socket
#   kubernetes  kubectl kustomize of each overlay, kubernetes-validate (strict),
#               tests/deploy/check_manifests.py, the ConfigMaps' configs
#   container   static binaries, podman build of deploy/container/Containerfile,
#               keybrokerd in it, sign through its socket from the host, push
#               the keybroker image itself and sign + verify it
# Usage: KEYBROKER_TEST_REGISTRY=127.0.0.1:PORT scripts/deploy-test.sh [SECTION...]
#   (the anonymous registry of scripts/registry.sh). Sections default to all four.
# Installs what is missing: systemd (apt), kubernetes-validate (pip), podman and
# runc (apt). The container section builds static release binaries once into
# target/static (CARGO_TARGET_DIR), or takes them from KEYBROKER_STATIC_BIN_DIR.
# Prints a timing per section; exits non-zero if any section failed.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bin=$root/target/debug
registry=${KEYBROKER_TEST_REGISTRY:?set KEYBROKER_TEST_REGISTRY (scripts/registry.sh start DIR; source DIR/registry.env)}
kube_versions=${KEYBROKER_KUBE_VERSIONS:-1.32 1.37}
sections=("$@")
[ ${#sections[@]} -gt 0 ] || sections=(systemd activation kubernetes container)
export DEBIAN_FRONTEND=noninteractive

for b in keybrokerd keybroker; do
  [ -x "$bin/$b" ] || { echo "deploy-test: $bin/$b missing: build the workspace first" >&2; exit 1; }
done

work=$(mktemp -d -t keybroker-deploy.XXXXXX)
trap 'rm -rf "$work"' EXIT
unset KEYBROKER_SOCKET NOTIFY_SOCKET LISTEN_FDS LISTEN_PID LISTEN_FDNAMES

say() { echo "deploy-test: $*"; }
fail() { echo "deploy-test: FAIL: $*" >&2; exit 1; }
skip() { echo "deploy-test: SKIP: $*"; exit 77; }

apt_install() { # packages...
  say "apt-get install $*"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

wait_for() { # seconds description test-command...: fails the section on timeout
  local secs=$1 what=$2; shift 2
  local i
  for ((i = 0; i < secs * 10; i++)); do "$@" && return 0; sleep 0.1; done
  fail "timed out after ${secs}s waiting for $what"
}

# One encrypted key pair (cosign's format) for every section, with its password
# in a file: what the example configs expect under /etc/keybroker.
keys=$work/keys
mkdir -p "$keys"
key_password=deploy-test-$$
(cd "$keys" && COSIGN_PASSWORD=$key_password "$bin/keybroker" generate-key-pair --output-key-prefix cosign >/dev/null 2>&1)
printf '%s\n' "$key_password" > "$keys/cosign.password"
cp "$keys/cosign.key" "$keys/release.key"
cp "$keys/cosign.password" "$keys/release.password"
cp "$keys/cosign.pub" "$keys/release.pub"

# An image to sign, pushed through the registry API with curl (as smoke.sh does).
push_test_image() { # repo tag → prints nothing; image is $registry/$repo:$tag
  local repo=$1 tag=$2 cfg cfg_digest loc sep manifest
  cfg='{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
  cfg_digest=sha256:$(printf '%s' "$cfg" | sha256sum | cut -d' ' -f1)
  loc=$(curl -fsS -X POST -D - -o /dev/null "http://$registry/v2/$repo/blobs/uploads/" | tr -d '\r' | sed -n 's/^[Ll]ocation: //p')
  case $loc in http*) ;; *) loc="http://$registry$loc" ;; esac
  sep='?'; case $loc in *\?*) sep='&' ;; esac
  curl -fsS -X PUT -H 'Content-Type: application/octet-stream' --data-binary "$cfg" "$loc${sep}digest=$cfg_digest" >/dev/null
  manifest='{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","size":'${#cfg}',"digest":"'$cfg_digest'"},"layers":[]}'
  curl -fsS -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' --data-binary "$manifest" "http://$registry/v2/$repo/manifests/$tag" >/dev/null
}

# `keybroker health --socket PATH` (exit 0 on SERVING) is the Kubernetes probe.
check_health() { # client-command... (keybroker health --socket PATH is appended by the caller)
  "$@" || fail "'$*' did not report SERVING"
}

# ---------------------------------------------------------------- systemd
section_systemd() {
  local units=$root/deploy/systemd sys=$work/sysroot out
  command -v systemd-analyze >/dev/null && command -v systemd-sysusers >/dev/null || apt_install systemd
  # A root with the distribution's units (sysinit.target & co.) and the binaries
  # the units name, so that verify checks ExecStart=/ExecReload= for real
  # without touching this machine's /usr/bin or /etc/systemd.
  mkdir -p "$sys/usr/bin" "$sys/usr/lib/systemd" "$sys/etc/systemd/system"
  ln -s usr/bin "$sys/bin"
  local unitdir=/usr/lib/systemd/system
  [ -d "$unitdir" ] || unitdir=/lib/systemd/system
  cp -a "$unitdir" "$sys/usr/lib/systemd/"
  cp "$(readlink -f "$(type -P kill)")" "$sys/usr/bin/kill"
  cp "$units/keybroker.socket" "$units/keybroker.service" "$sys/etc/systemd/system/"

  # Without the daemon binary, verify must complain (it checks ExecStart).
  if out=$(systemd-analyze verify --root="$sys" keybroker.socket keybroker.service 2>&1) \
    || ! grep -q '/usr/bin/keybrokerd' <<<"$out"; then
    fail "systemd-analyze verify did not notice a missing /usr/bin/keybrokerd: $out"
  fi
  ln "$bin/keybrokerd" "$sys/usr/bin/keybrokerd" 2>/dev/null || cp "$bin/keybrokerd" "$sys/usr/bin/keybrokerd"
  # verify exits 0 on unknown directives and only prints them: any output fails.
  out=$(systemd-analyze verify --root="$sys" keybroker.socket keybroker.service 2>&1) \
    || fail "systemd-analyze verify: $out"
  [ -z "$out" ] || fail "systemd-analyze verify printed warnings: $out"
  say "systemd-analyze verify keybroker.socket keybroker.service: clean"

  # The hardening as systemd itself scores it (0 = fully locked down, 10 = none).
  out=$(systemd-analyze security --offline=true --root="$sys" --threshold=20 --no-pager keybroker.service 2>&1) \
    || fail "systemd-analyze security: exposure above 2.0: $(tail -1 <<<"$out")"
  say "$(grep 'Overall exposure' <<<"$out" | sed 's/→ *//')"

  # Every hardening directive the issue names is set, with a comment above it.
  local d prev
  for d in NoNewPrivileges=yes ProtectSystem=strict ProtectHome=yes PrivateTmp=yes PrivateDevices=yes \
    ProtectKernelTunables=yes ProtectKernelModules=yes ProtectKernelLogs=yes ProtectControlGroups=yes \
    'RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6' RestrictNamespaces=yes LockPersonality=yes \
    MemoryDenyWriteExecute=yes SystemCallFilter=@system-service SystemCallArchitectures=native \
    CapabilityBoundingSet= UMask=0077 LimitCORE=0 Type=notify User=keybroker Group=keybroker \
    StateDirectory=keybroker RuntimeDirectory=keybroker LogsDirectory=keybroker RuntimeDirectoryPreserve=yes; do
    grep -qxF "$d" "$units/keybroker.service" || fail "keybroker.service: no line '$d'"
    prev=$(grep -xF -B1 "$d" "$units/keybroker.service" | head -1)
    case $d in
      Type=*|User=*|Group=*|*Directory=*|RuntimeDirectoryPreserve=*) ;;
      *) [[ $prev == '#'* ]] || fail "keybroker.service: '$d' has no comment justifying it" ;;
    esac
  done
  for d in ListenStream=/run/keybroker/keybroker.sock SocketMode=0660 SocketGroup=keybroker; do
    grep -qxF "$d" "$units/keybroker.socket" || fail "keybroker.socket: no line '$d'"
  done

  # systemd-sysusers creates the user and group in an empty root.
  mkdir -p "$work/sysusers/etc"
  systemd-sysusers --root="$work/sysusers" "$units/keybroker.sysusers.conf" >/dev/null 2>&1 \
    || fail "systemd-sysusers rejected keybroker.sysusers.conf"
  grep -q '^keybroker:x:[0-9]*:[0-9]*:[^:]*:/var/lib/keybroker:/usr/sbin/nologin$' "$work/sysusers/etc/passwd" \
    || fail "systemd-sysusers: no keybroker system user: $(cat "$work/sysusers/etc/passwd")"
  grep -q '^keybroker:x:' "$work/sysusers/etc/group" || fail "systemd-sysusers: no keybroker group"
  say "systemd-sysusers: $(cat "$work/sysusers/etc/passwd")"

  # The example config, with its /etc/keybroker files replaced by the test key.
  sed "s#/etc/keybroker/#$keys/#g" "$units/keybrokerd.toml" > "$work/systemd-keybrokerd.toml"
  "$bin/keybrokerd" --check-config "$work/systemd-keybrokerd.toml"
}

# ------------------------------------------------------------- activation
section_activation() {
  local act=$work/activation
  mkdir -p "$act"
  local sock=$act/keybroker.sock notify=$act/notify.sock log=$act/notify.log cfg=$act/keybrokerd.toml
  command -v systemd-socket-activate >/dev/null || apt_install systemd
  # Not local: the EXIT trap runs after this function has returned.
  listener= sa=
  trap '[ -z "$sa" ] || kill -KILL "$sa" 2>/dev/null || true; [ -z "$listener" ] || kill "$listener" 2>/dev/null || true' EXIT

  python3 "$root/tests/deploy/notify_listener.py" "$notify" "$log" &
  listener=$!
  wait_for 10 "the NOTIFY_SOCKET listener" test -S "$notify"

  # deploy/systemd/keybrokerd.toml as shipped, keys from the test dir, the
  # fallback socket path somewhere it must never appear, and a rule letting this
  # test's uid sign in the test registry.
  sed -e "s#/etc/keybroker/#$keys/#g" -e "s#^socket = .*#socket = \"$act/not-used.sock\"#" \
    "$root/deploy/systemd/keybrokerd.toml" > "$cfg"
  cat >> "$cfg" <<TOML

[[policy]]
callers = ["uid:$(id -u)"]
keys = ["release"]
images = ["$registry/deploy/**"]
require_annotations = ["commit"]
TOML
  "$bin/keybrokerd" --check-config "$cfg" >/dev/null

  # systemd-socket-activate passes only PATH, HOME, TERM, PWD and LISTEN_*: the
  # notify socket goes in with -E. It binds, then waits for the first connection.
  systemd-socket-activate -l "$sock" -E NOTIFY_SOCKET="$notify" -E KEYBROKER_LOG=info \
    "$bin/keybrokerd" --config "$cfg" >"$act/daemon.log" 2>&1 &
  sa=$!
  wait_for 10 "systemd-socket-activate's socket" test -S "$sock"
  sleep 0.3
  [ "$(readlink "/proc/$sa/exe")" != "$(readlink -f "$bin/keybrokerd")" ] \
    || fail "keybrokerd started before the first connection"
  [ ! -s "$log" ] || fail "notification before the daemon started: $(cat "$log")"

  local repo=deploy/activation$$ image
  image=$registry/deploy/activation$$:v1
  push_test_image "$repo" v1
  # The first connection starts the daemon; sign waits for it on the socket backlog.
  "$bin/keybroker" --socket "$sock" sign "$image" --key release -a commit=activation \
    || { cat "$act/daemon.log" >&2; fail "keybroker sign through the activated socket"; }
  "$bin/keybroker" verify "$image" --key "$keys/release.pub" 2>/dev/null | grep -q '"commit":"activation"' \
    || fail "the signature made through the activated socket does not verify"
  [ "$(readlink "/proc/$sa/exe")" = "$(readlink -f "$bin/keybrokerd")" ] \
    || fail "the process systemd-socket-activate started is not keybrokerd"
  wait_for 5 "READY=1 on NOTIFY_SOCKET" grep -qx 'READY=1' "$log"
  [ ! -e "$act/not-used.sock" ] || fail "the daemon bound its config's socket instead of the inherited one"
  say "socket activation: sign + verify through $sock; notifications: $(grep -v '^--$' "$log" | tr '\n' ' ')"

  # SIGHUP (ExecReload=): RELOADING=1, then READY=1 again.
  kill -HUP "$sa"
  wait_for 10 "RELOADING=1 then READY=1 after SIGHUP" \
    bash -c "grep -x -A100 'RELOADING=1' '$log' | grep -qx 'READY=1'"
  "$bin/keybroker" --socket "$sock" keys | grep -q '^release' || fail "no release key after reload"

  # Checked here, reported at the end, so the stop checks below still run.
  local health=ok
  "$bin/keybroker" health --socket "$sock" || health=failed

  # SIGTERM: STOPPING=1; the socket file belongs to systemd and stays.
  kill -TERM "$sa"
  wait_for 10 "keybrokerd to stop" bash -c "! kill -0 $sa 2>/dev/null"
  sa=
  grep -qx 'STOPPING=1' "$log" || fail "no STOPPING=1 on SIGTERM"
  [ -S "$sock" ] || fail "the daemon removed the socket systemd passed it"
  say "SIGHUP: RELOADING=1 + READY=1; SIGTERM: STOPPING=1, socket kept"
  [ $health = ok ] || fail "'keybroker health --socket $sock' did not report SERVING"
}

# ------------------------------------------------------------- kubernetes
section_kubernetes() {
  local k=$work/k8s overlay out f
  mkdir -p "$k"
  command -v kubectl >/dev/null || skip "kubernetes: kubectl not installed, manifests not rendered or checked"
  python3 -c 'import kubernetes_validate' 2>/dev/null || {
    say "pip install kubernetes-validate"
    python3 -m pip install -q --disable-pip-version-check 'kubernetes-validate==1.37.0'
  }
  local rendered=()
  for overlay in "$root"/deploy/kubernetes/overlays/*/; do
    overlay=$(basename "$overlay")
    kubectl kustomize "$root/deploy/kubernetes/overlays/$overlay" > "$k/$overlay.yaml" \
      || fail "kubectl kustomize overlays/$overlay"
    say "kustomize overlays/$overlay: $(grep -c '^kind:' "$k/$overlay.yaml") resources"
    rendered+=("$k/$overlay.yaml")
  done
  [ ${#rendered[@]} -ge 2 ] || fail "expected the node-agent and central overlays"
  local versions=()
  for v in $kube_versions; do versions+=(--kube-version "$v"); done
  python3 "$root/tests/deploy/validate_manifests.py" "${versions[@]}" "${rendered[@]}" > "$k/validate.log" \
    || { grep -v '^ok ' "$k/validate.log" >&2; fail "kubernetes-validate"; }
  grep -v '^ok ' "$k/validate.log"
  python3 "$root/tests/deploy/check_manifests.py" --self-test --extract-configs "$k/configs" "${rendered[@]}"

  # The ConfigMaps' configs, keys replaced by the test key (same file names as
  # the Secret keybroker-release-key: cosign.key, cosign.password).
  # The central service's mTLS files (the Secret keybroker-tls): a test CA and a
  # server certificate, so --check-config parses them as the listener would.
  local tls=$k/tls
  mkdir -p "$tls"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
    -subj /CN=keybroker-test-ca -keyout "$tls/ca.key" -out "$tls/ca.crt" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=keybroker \
    -keyout "$tls/tls.key" -out "$tls/tls.csr" 2>/dev/null
  printf 'subjectAltName=DNS:keybroker.keybroker.svc\nextendedKeyUsage=serverAuth\n' > "$tls/ext.cnf"
  openssl x509 -req -in "$tls/tls.csr" -CA "$tls/ca.crt" -CAkey "$tls/ca.key" -days 1 \
    -extfile "$tls/ext.cnf" -out "$tls/tls.crt" 2>/dev/null
  local n=0
  for f in "$k"/configs/*.toml; do
    sed -i -e "s#/etc/keybroker/keys/#$keys/#g" -e "s#/etc/keybroker/tls/#$tls/#g" "$f"
    if out=$("$bin/keybrokerd" --check-config "$f" 2>&1); then
      say "check-config $(basename "$f"): ok"
      n=$((n + 1))
    else
      fail "keybrokerd --check-config $(basename "$f"): $out"
    fi
  done
  [ $n -ge 2 ] || fail "expected the node-agent and central configs to pass --check-config"
}

# -------------------------------------------------------------- container
section_container() {
  # Not local: the EXIT trap (pm) runs after this function has returned.
  c=$work/container
  mkdir -p "$c"
  command -v podman >/dev/null && command -v runc >/dev/null || apt_install podman runc
  command -v readelf >/dev/null && command -v strip >/dev/null || apt_install binutils

  # Static keybrokerd and keybroker (no loader, no libc in a FROM scratch image).
  local static=${KEYBROKER_STATIC_BIN_DIR:-}
  if [ -z "$static" ]; then
    say "cargo build --release (static, target/static)"
    CARGO_TARGET_DIR=$root/target/static RUSTFLAGS='-C target-feature=+crt-static' \
      cargo build --release --locked --target x86_64-unknown-linux-gnu \
      -p keybroker-broker -p keybroker-client
    static=$root/target/static/x86_64-unknown-linux-gnu/release
  fi
  mkdir -p "$c/ctx"
  local b
  for b in keybrokerd keybroker; do
    cp "$static/$b" "$c/ctx/$b"
    # The release profile keeps debug info: ~5x the size, of no use in the image.
    strip --strip-debug "$c/ctx/$b"
    ! readelf -lW "$c/ctx/$b" | grep -q 'program interpreter' || fail "$static/$b is not static"
  done

  # podman as it runs on these machines: vfs storage and runc, cgroupfs, no
  # default ulimits, everything in the test's temp dir.
  printf '[containers]\ndefault_ulimits = []\n\n[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n' \
    > "$c/containers.conf"
  export CONTAINERS_CONF=$c/containers.conf
  pm() { podman --storage-driver vfs --runtime runc --root "$c/root" --runroot "$c/runroot" "$@"; }
  local name=keybroker-deploy-test-$$ tag=localhost/keybroker:deploy-test
  trap 'pm rm -f -t 0 '"$name"' >/dev/null 2>&1 || true' EXIT

  local revision version
  revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
  version=$("$static/keybrokerd" --version | awk '{print $2}')
  pm build --quiet -f "$root/deploy/container/Containerfile" \
    --build-arg SOURCE="$(git config --get remote.origin.url 2>/dev/null || echo local)" \
    --build-arg VERSION="$version" --build-arg REVISION="$revision" \
    -t "$tag" "$c/ctx" >/dev/null
  [ "$(pm image inspect --format '{{index .Labels "org.opencontainers.image.revision"}}' "$tag")" = "$revision" ] \
    || fail "image label org.opencontainers.image.revision is not $revision"
  [ "$(pm image inspect --format '{{index .Labels "org.opencontainers.image.version"}}' "$tag")" = "$version" ] \
    || fail "image label org.opencontainers.image.version is not $version"
  [ "$(pm image inspect --format '{{.Config.User}}' "$tag")" = 65532:65532 ] || fail "image user is not 65532:65532"
  say "image $tag: $(pm image inspect --format '{{.Size}}' "$tag") bytes, version $version, revision $revision"

  # The node agent's ConfigMap config (deploy/kubernetes/base) as the container
  # config, plus a rule letting this host's uid sign in the test registry. Keys
  # and config read-only; the socket directory bind-mounted, owned by the
  # container's uid; gid 2000 added as the DaemonSet's supplementalGroups does.
  mkdir -p "$c/etc/keys" "$c/run"
  cp "$keys/cosign.key" "$keys/cosign.password" "$c/etc/keys/"
  chown -R 65532:65532 "$c/etc/keys"; chmod 0500 "$c/etc/keys"; chmod 0400 "$c/etc/keys"/*
  cp "$root/deploy/kubernetes/base/keybrokerd.toml" "$c/etc/keybrokerd.toml"
  cat >> "$c/etc/keybrokerd.toml" <<TOML

[[policy]]
callers = ["uid:$(id -u)"]
keys = ["release"]
images = ["$registry/**"]
require_annotations = ["commit"]
TOML
  chmod 0444 "$c/etc/keybrokerd.toml"
  chown 65532:2000 "$c/run"; chmod 0750 "$c/run"
  pm run -d --name "$name" --network none --read-only --cap-drop all \
    --security-opt no-new-privileges --group-add 2000 \
    -v "$c/etc/keybrokerd.toml:/etc/keybroker/keybrokerd.toml:ro" \
    -v "$c/etc/keys:/etc/keybroker/keys:ro" \
    -v "$c/run:/run/keybroker" \
    "$tag" >/dev/null
  local sock=$c/run/keybroker.sock
  local i
  for ((i = 0; i < 300; i++)); do [ -S "$sock" ] && break; sleep 0.1; done
  [ -S "$sock" ] || { pm logs "$name" >&2 || true; fail "keybrokerd in the container did not create its socket in 30 s"; }
  [ "$(stat -c '%u %g %a' "$sock")" = "65532 2000 660" ] \
    || fail "socket owner/group/mode: $(stat -c '%u %g %a' "$sock"), want 65532 2000 660"

  local image=$registry/deploy/container$$:v1
  push_test_image deploy/container$$ v1
  "$bin/keybroker" --socket "$sock" sign "$image" --key release -a commit=container \
    || { pm logs "$name" >&2; fail "keybroker sign through the container's socket"; }
  "$bin/keybroker" verify "$image" --key "$keys/cosign.pub" 2>/dev/null | grep -q '"commit":"container"' \
    || fail "the signature made by the containerised daemon does not verify"
  say "signed $image through the container's socket"

  # The product signs its own release: push the keybroker image, sign, verify.
  local self=$registry/keybroker/keybroker:$version-test$$ digest
  pm push --quiet --tls-verify=false --digestfile "$c/digest" "$tag" "docker://$self" >/dev/null
  digest=$(cat "$c/digest")
  "$bin/keybroker" --socket "$sock" sign "$self" --key release -a commit="$revision" -a repo=keybroker
  # Both formats were written (the default): the classic payload names the
  # digest, and the bundle's statement has it as its subject.
  "$bin/keybroker" verify "$self" --key "$keys/cosign.pub" --prefer classic 2>/dev/null > "$c/verified.json"
  grep -q "\"docker-manifest-digest\":\"$digest\"" "$c/verified.json" \
    || fail "verified payload is not for the pushed digest $digest: $(cat "$c/verified.json")"
  "$bin/keybroker" verify "$self" --key "$keys/cosign.pub" --prefer bundle 2>/dev/null > "$c/verified.json"
  grep -q "\"sha256\":\"${digest#sha256:}\"" "$c/verified.json" \
    || fail "verified statement is not about the pushed digest $digest: $(cat "$c/verified.json")"
  say "keybroker image $self@$digest pushed, signed by its own daemon, verified"

  # The Kubernetes probe command, inside the container.
  check_health pm exec "$name" /usr/bin/keybroker health --socket /run/keybroker/keybroker.sock
}

# ------------------------------------------------------------------ runner
declare -A took result
failed=0
for s in "${sections[@]}"; do
  declare -F "section_$s" >/dev/null || { echo "deploy-test: unknown section $s" >&2; exit 2; }
  echo "== deploy-test: $s"
  t0=$EPOCHREALTIME
  set +e
  ( set -e; "section_$s" )
  rc=$?
  set -e
  took[$s]=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
  case $rc in
    0) result[$s]=PASS ;;
    77) result[$s]=SKIP ;;
    *) result[$s]=FAIL; failed=$((failed + 1)) ;;
  esac
done
echo "== deploy-test: timings"
for s in "${sections[@]}"; do printf '  %-11s %-4s %6s s\n' "$s" "${result[$s]}" "${took[$s]}"; done
passed=0 skipped=0
for s in "${sections[@]}"; do
  case ${result[$s]} in PASS) passed=$((passed + 1)) ;; SKIP) skipped=$((skipped + 1)) ;; esac
done
echo "deploy-test: $passed passed, $failed failed, $skipped skipped"
[ $failed -eq 0 ]

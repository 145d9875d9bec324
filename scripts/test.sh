#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what the tests need, starts
# the real servers on 127.0.0.1 (once for the whole run), runs every test, stops
# the servers. This is the command README.md names and .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)

scripts/install-test-deps.sh

state=$(mktemp -d -t keybroker-test.XXXXXX)
cleanup() {
  scripts/registry.sh stop "$state" || true
  scripts/openbao.sh stop "$state" || true
  scripts/moto.sh stop "$state" || true
  scripts/kmock.sh stop "$state" || true
  scripts/gcpkms.sh stop "$state" || true
  scripts/tsa.sh stop "$state" || true
  rm -rf "$state"
}
trap cleanup EXIT

echo "== build (once, all targets)"
cargo build --workspace --all-targets --locked
# Static binaries for the container image of the deploy tests
# (deploy/container/Containerfile is FROM scratch). The dev profile, not
# --release: same code, a third of the build time on 2 cores; deploy/README.md
# builds release images.
static_dir=target/static/x86_64-unknown-linux-gnu/debug
echo "== build (static keybrokerd + keybroker for the container image)"
CARGO_TARGET_DIR=target/static RUSTFLAGS='-C target-feature=+crt-static' \
  cargo build --locked --target x86_64-unknown-linux-gnu -p keybroker-broker -p keybroker-client

# The client links no cloud SDK even when the workspace build unifies the
# daemon's provider features (ARCHITECTURE.md).
if nm -C target/debug/keybroker | grep -qE 'vaultrs::|aws_sdk_kms::|gcp_kms::'; then
  echo "keybroker (client) links a cloud SDK" >&2; exit 1
fi

echo "== servers"
scripts/registry.sh start "$state"
scripts/openbao.sh start "$state"
scripts/moto.sh start "$state"
scripts/kmock.sh start "$state"
scripts/gcpkms.sh start "$state"
scripts/tsa.sh start "$state"
# shellcheck disable=SC1091
source "$state/registry.env"
# shellcheck disable=SC1091
source "$state/openbao.env"
# shellcheck disable=SC1091
source "$state/moto.env"
export KEYBROKER_TEST_REGISTRY KEYBROKER_TEST_AUTH_REGISTRY KEYBROKER_TEST_AUTH_USER KEYBROKER_TEST_AUTH_PASSWORD
# shellcheck disable=SC1091
source "$state/kmock.env"
# shellcheck disable=SC1091
source "$state/gcpkms.env"
# shellcheck disable=SC1091
source "$state/tsa.env"
export KEYBROKER_TEST_VAULT_ADDR KEYBROKER_TEST_VAULT_TOKEN KEYBROKER_TEST_AWS_ENDPOINT
export KEYBROKER_TEST_KUBE_API KEYBROKER_TEST_KUBECONFIG
export KEYBROKER_TEST_TSA_URL KEYBROKER_TEST_TSA_CHAIN

echo "== the API fakes' own self-test (GitHub, GitLab)"
python3 tests/fakes/test_fakes.py

echo "== the sigstore-js bundle verifier's own self-test"
node tests/sigstore-js/selftest.mjs

echo "== tests"
# CI=true makes tests that need a server fail (not skip) when it is missing.
CI=true cargo test --workspace --locked

echo "== smoke: the real binaries, README's first command included"
scripts/smoke.sh "$KEYBROKER_TEST_REGISTRY"

echo "== deploy: systemd units and activation, Kubernetes manifests, container image"
KEYBROKER_STATIC_BIN_DIR=$static_dir scripts/deploy-test.sh

echo "== fuzz: a 30 s smoke run of every cargo-fuzz target (fuzz/, nightly; docs/RELIABILITY.md)"
scripts/fuzz.sh smoke "${KEYBROKER_FUZZ_SMOKE_SECS:-30}"

echo "== test suite finished in $(( $(date +%s) - started )) s"

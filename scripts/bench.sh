#!/usr/bin/env bash
# The benchmark (docs/PERFORMANCE.md): release build, a real registry on
# 127.0.0.1 for the client phase, then keybroker-bench. Bounded: each phase runs
# 3 s or 2,000,000 requests, whichever comes first.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = barrage ]; then
  # docs/RELIABILITY.md: the hostile-input barrage of broker/tests/hostile.rs on
  # a release build, with the healthy client's p99 target enforced.
  echo "date: $(date -u +%FT%TZ); cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)"
  KEYBROKER_BARRAGE_P99_MS=50 cargo test --release --locked -p keybroker-broker --test hostile \
    a_bounded_barrage -- --nocapture 2>&1 | grep -E '^(no barrage|barrage):|test result|panicked'
  exit "${PIPESTATUS[0]}"
fi
scripts/install-test-deps.sh
cargo build --release --locked -p keybroker-broker -p keybroker-client -p keybroker-bench
state=$(mktemp -d -t keybroker-bench.XXXXXX)
trap 'scripts/registry.sh stop "$state"; scripts/openbao.sh stop "$state"; scripts/moto.sh stop "$state"; rm -rf "$state"' EXIT
scripts/registry.sh start "$state" >/dev/null
scripts/openbao.sh start "$state" >/dev/null
scripts/moto.sh start "$state" >/dev/null
# shellcheck disable=SC1091
source "$state/registry.env"
# shellcheck disable=SC1091
source "$state/openbao.env"
# shellcheck disable=SC1091
source "$state/moto.env"
export KEYBROKER_TEST_REGISTRY KEYBROKER_TEST_VAULT_ADDR KEYBROKER_TEST_VAULT_TOKEN KEYBROKER_TEST_AWS_ENDPOINT
echo "date: $(date -u +%FT%TZ); cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)"
target/release/keybroker-bench

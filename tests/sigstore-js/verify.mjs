#!/usr/bin/env node
// Independent check of a keybroker Sigstore bundle with sigstore-js
// (@sigstore/verify), so the Rust tests do not only verify our bundles with our
// own code.
//
//   node tests/sigstore-js/verify.mjs --bundle FILE --key PUBKEY.pem
//        [--tsa-chain CHAIN.pem] [--digest sha256:HEX]
//
// Success: one JSON line {"ok":true,...} on stdout, exit 0.
// Verification failure: {"ok":false,"error":"..."} on stdout, exit 1.
// Usage error (also: an input file that is missing or not a key/certificate):
// message on stderr, exit 2.
//
// Trust is fully offline: the one managed key from --key, no transparency log,
// no CT log, and (only with --tsa-chain) one timestamp authority.
import { readFileSync } from 'node:fs';
import { createHash, createPublicKey, X509Certificate } from 'node:crypto';
import { bundleFromJSON } from '@sigstore/bundle';
import { PublicKeyDetails, TrustedRoot } from '@sigstore/protobuf-specs';
import { Verifier, toSignedEntity, toTrustMaterial } from '@sigstore/verify';

const USAGE =
  'usage: node verify.mjs --bundle FILE --key PUBKEY.pem [--tsa-chain CHAIN.pem] [--digest sha256:HEX]';

class UsageError extends Error {}

function parseArgs(argv) {
  const known = new Set(['--bundle', '--key', '--tsa-chain', '--digest']);
  const opts = {};
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    if (!known.has(flag)) throw new UsageError(`unknown argument: ${flag}`);
    if (i + 1 >= argv.length) throw new UsageError(`${flag} needs a value`);
    if (opts[flag] !== undefined) throw new UsageError(`${flag} given twice`);
    opts[flag] = argv[++i];
  }
  if (!opts['--bundle'] || !opts['--key']) throw new UsageError('--bundle and --key are required');
  let digest;
  if (opts['--digest'] !== undefined) {
    const m = /^sha256:([0-9a-fA-F]{64})$/.exec(opts['--digest']);
    if (!m) throw new UsageError('--digest must be sha256:<64 hex digits>');
    digest = m[1].toLowerCase();
  }
  // The trusted inputs are the caller's, not the thing under test: a missing or
  // unreadable file is a usage error (exit 2), so a broken test harness cannot
  // pass for a rejected bundle.
  const bundleText = readInput(opts['--bundle']);
  let spki;
  try {
    spki = createPublicKey(readInput(opts['--key'])).export({ type: 'spki', format: 'der' });
  } catch (e) {
    if (e instanceof UsageError) throw e;
    throw new UsageError(`--key ${opts['--key']}: not a public key: ${e.message}`);
  }
  const tsaChain = opts['--tsa-chain'] !== undefined ? pemCertificates(opts['--tsa-chain']) : undefined;
  return { bundleText, spki, tsaChain, digest };
}

function readInput(path) {
  try {
    return readFileSync(path, 'utf8');
  } catch (e) {
    throw new UsageError(`cannot read ${path}: ${e.message}`);
  }
}

// All PEM CERTIFICATE blocks of a file, in file order, as DER.
function pemCertificates(path) {
  const text = readInput(path);
  const re = /-----BEGIN CERTIFICATE-----([\s\S]*?)-----END CERTIFICATE-----/g;
  const ders = [];
  for (let m = re.exec(text); m; m = re.exec(text)) {
    const der = Buffer.from(m[1].replace(/\s+/g, ''), 'base64');
    try {
      new X509Certificate(der);
    } catch (e) {
      throw new UsageError(`--tsa-chain ${path}: certificate ${ders.length + 1}: ${e.message}`);
    }
    ders.push(der);
  }
  if (ders.length === 0) throw new UsageError(`--tsa-chain ${path}: no PEM certificate`);
  return ders;
}

// The trusted root sigstore-js builds trust material from, in the JSON shape of
// a trusted_root.json. What @sigstore/verify 3.1.1 / @sigstore/core 3.2.1 do
// with a timestamp authority (line numbers are of their dist/ files):
// - the chain must be ordered leaf first: certChain[0] is taken as the TSA
//   signing certificate and must match the token's SignerInfo issuer + serial;
//   the remaining certificates are the trusted CAs, so a lone self-signed TSA
//   certificate does not verify (verify timestamp/tsa.js:13,36,43);
// - the token is checked against the raw bytes of the DSSE signature
//   (signatures[0].sig, base64-decoded): its messageImprint must be the hash of
//   those bytes (verify verifier.js:53, bundle/dsse.js:34-37, core
//   rfc3161/tstinfo.js:61), i.e. the TSA was asked to stamp sha256(sig);
// - signedTimestamp is parsed as a whole TimeStampResp (status, then the token)
//   (core rfc3161/timestamp.js:140-147), the SignerInfo signature must be ECDSA
//   (core rfc3161/timestamp.js:93) and signed attributes must be present;
// - validFor is left out here, which means "valid at any time"
//   (verify trust/index.js:60-70); the certificates' own validity is still
//   checked at the token's genTime. No EKU, policy or nonce check.
function trustedRoot(tsaChainDers) {
  const timestampAuthorities = tsaChainDers
    ? [
        {
          subject: { organization: 'keybroker-test', commonName: 'test TSA' },
          uri: 'https://tsa.invalid',
          certChain: { certificates: tsaChainDers.map((d) => ({ rawBytes: d.toString('base64') })) },
        },
      ]
    : [];
  return TrustedRoot.fromJSON({
    mediaType: 'application/vnd.dev.sigstore.trustedroot+json;version=0.1',
    tlogs: [],
    certificateAuthorities: [],
    ctlogs: [],
    timestampAuthorities,
  });
}

function verify(args) {
  const bundleJSON = JSON.parse(args.bundleText);
  // bundleFromJSON also checks the shape: mediaType, exactly one DSSE
  // signature, non-empty payload and sig.
  const bundle = bundleFromJSON(bundleJSON);
  const vm = bundle.verificationMaterial.content;
  if (vm?.$case !== 'publicKey') {
    throw new Error(`verificationMaterial is ${vm?.$case ?? 'empty'}, expected publicKey`);
  }
  if (bundle.content.$case !== 'dsseEnvelope') {
    throw new Error(`bundle content is ${bundle.content.$case}, expected dsseEnvelope`);
  }
  const hint = vm.publicKey.hint;

  // How sigstore-js finds the key (@sigstore/verify 3.1.1): toSignedEntity()
  // hands verificationMaterial.publicKey.hint through unchanged
  // (dist/bundle/index.js:45), and the key finder toTrustMaterial() builds from
  // a plain object is an exact string lookup `keys[hint]`, failing with
  // PUBLIC_KEY_ERROR "key not found: <hint>" (dist/trust/index.js:72-80). The
  // hint is never recomputed from the key, so we register the one trusted key
  // under whatever hint the bundle carries (an absent hint reads as ""), and
  // report separately whether it is cosign's hint: base64(sha256(DER
  // SubjectPublicKeyInfo)), standard alphabet with padding (cosign
  // internal/key/svkeypair.go:52-57). The key is used with Node's default
  // digest for EC keys, SHA-256, so only P-256/SHA-256 keys make sense here.
  const cosignHint = createHash('sha256').update(args.spki).digest('base64');
  const keys = {
    [hint]: { rawBytes: args.spki, keyDetails: PublicKeyDetails.PKIX_ECDSA_P256_SHA_256, validFor: undefined },
  };

  const tsaChain = args.tsaChain;
  const trust = toTrustMaterial(trustedRoot(tsaChain), keys);
  // Every RFC 3161 token in the bundle is verified whatever the threshold
  // (Verifier.verifyTimestamps), so a timestamped bundle fails without
  // --tsa-chain; the threshold only says how many must be there.
  const verifier = new Verifier(trust, {
    tlogThreshold: 0,
    ctlogThreshold: 0,
    timestampThreshold: tsaChain ? 1 : 0,
  });
  const entity = toSignedEntity(bundle);
  verifier.verify(entity);

  const env = bundle.content.dsseEnvelope;
  let statement;
  try {
    statement = JSON.parse(Buffer.from(env.payload).toString('utf8'));
  } catch (e) {
    throw new Error(`DSSE payload is not JSON: ${e.message}`);
  }
  const subjects = Array.isArray(statement?.subject) ? statement.subject : [];
  if (args.digest && !subjects.some((s) => String(s?.digest?.sha256 ?? '').toLowerCase() === args.digest)) {
    throw new Error(`no subject has digest sha256:${args.digest}`);
  }
  return {
    ok: true,
    mediaType: bundle.mediaType,
    hint,
    hintIsCosignKeyDigest: hint === cosignHint,
    payloadType: env.payloadType,
    statementType: statement?._type,
    predicateType: statement?.predicateType,
    subjects: subjects.map((s) => ({ name: s?.name, digest: s?.digest, annotations: s?.annotations })),
    timestamps: entity.timestamps.length,
  };
}

function main() {
  let args;
  try {
    args = parseArgs(process.argv.slice(2));
  } catch (e) {
    process.stderr.write(`${e.message}\n${USAGE}\n`);
    process.exit(2);
  }
  try {
    process.stdout.write(JSON.stringify(verify(args)) + '\n');
    process.exit(0);
  } catch (e) {
    const out = { ok: false, error: e?.message ?? String(e) };
    if (e?.code) out.code = e.code;
    if (e?.fields) out.fields = e.fields;
    process.stdout.write(JSON.stringify(out) + '\n');
    process.exit(1);
  }
}

main();

#!/usr/bin/env node
// Self-test of verify.mjs: builds key-signed DSSE bundles in the shape keybroker
// writes (cosign v3 / sigstore-go: bundle v0.3, publicKey hint, no tlog), plus
// an RFC 3161 token from `openssl ts -reply`, and checks that verify.mjs accepts
// the good ones and rejects each broken one. Exits non-zero on the first
// failed check.
//
//   node tests/sigstore-js/selftest.mjs
import { execFileSync, spawnSync } from 'node:child_process';
import { createHash, generateKeyPairSync, sign } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const VERIFY = join(dirname(fileURLToPath(import.meta.url)), 'verify.mjs');
const BUNDLE_MEDIA_TYPE = 'application/vnd.dev.sigstore.bundle.v0.3+json';
const PAYLOAD_TYPE = 'application/vnd.in-toto+json';
const IMAGE_DIGEST = createHash('sha256').update('keybroker selftest image').digest('hex');

const dir = mkdtempSync(join(tmpdir(), 'kb-sigstore-js-'));
let checks = 0;

function fail(msg) {
  process.stderr.write(`selftest FAILED: ${msg}\n(files kept in ${dir})\n`);
  process.exit(1);
}

function file(name, content) {
  const p = join(dir, name);
  writeFileSync(p, content);
  return p;
}

// DSSE v1 pre-authentication encoding; lengths are byte lengths.
function pae(type, body) {
  const t = Buffer.from(type, 'utf8');
  return Buffer.concat([
    Buffer.from(`DSSEv1 ${t.length} `, 'ascii'),
    t,
    Buffer.from(` ${body.length} `, 'ascii'),
    body,
  ]);
}

function newKey() {
  const { publicKey, privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const spki = publicKey.export({ type: 'spki', format: 'der' });
  return {
    privateKey,
    pem: publicKey.export({ type: 'spki', format: 'pem' }),
    // cosign v3's hint for a key: base64(sha256(DER SPKI)).
    hint: createHash('sha256').update(spki).digest('base64'),
  };
}

function statement(digest) {
  return {
    _type: 'https://in-toto.io/Statement/v1',
    subject: [
      {
        name: '127.0.0.1:5000/selftest/app',
        digest: { sha256: digest },
        annotations: { 'dev.keybroker.caller': 'uid=1000' },
      },
    ],
    predicateType: 'https://slsa.dev/provenance/v1',
    predicate: { buildDefinition: { buildType: 'https://keybroker.dev/selftest' } },
  };
}

// Returns the bundle object and the raw DSSE signature (what a TSA stamps).
function makeBundle(key, { hint = key.hint } = {}) {
  const body = Buffer.from(JSON.stringify(statement(IMAGE_DIGEST)));
  const sig = sign('sha256', pae(PAYLOAD_TYPE, body), { key: key.privateKey, dsaEncoding: 'der' });
  const verificationMaterial = { publicKey: { hint }, tlogEntries: [] };
  const bundle = {
    mediaType: BUNDLE_MEDIA_TYPE,
    verificationMaterial,
    dsseEnvelope: {
      payload: body.toString('base64'),
      payloadType: PAYLOAD_TYPE,
      signatures: [{ sig: sig.toString('base64') }],
    },
  };
  return { bundle, sig };
}

function run(args) {
  const r = spawnSync(process.execPath, [VERIFY, ...args], { encoding: 'utf8' });
  let json;
  try {
    json = JSON.parse(r.stdout);
  } catch {
    json = undefined;
  }
  return { code: r.status, json, stdout: r.stdout, stderr: r.stderr };
}

function expectOk(name, args, check = () => {}) {
  const r = run(args);
  if (r.code !== 0 || r.json?.ok !== true) fail(`${name}: expected ok, got exit ${r.code}: ${r.stdout}${r.stderr}`);
  check(r.json);
  checks++;
  console.log(`ok   ${name}`);
  return r.json;
}

function expectFail(name, args, errorRe) {
  const r = run(args);
  if (r.code !== 1 || r.json?.ok !== false) fail(`${name}: expected exit 1 and ok:false, got exit ${r.code}: ${r.stdout}${r.stderr}`);
  if (errorRe && !errorRe.test(r.json.error)) fail(`${name}: error ${JSON.stringify(r.json.error)} does not match ${errorRe}`);
  checks++;
  console.log(`ok   ${name} (rejected: ${r.json.error})`);
}

function assert(cond, msg) {
  if (!cond) fail(msg);
}

function openssl(...args) {
  execFileSync('openssl', args, { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
}

// A two-level test TSA: self-signed root CA, and a leaf with the critical
// timeStamping EKU that `openssl ts -reply` insists on. Returns a function
// that stamps a SHA-256 digest and yields the DER TimeStampResp, which is what
// sigstore bundles carry in signedTimestamp (sigstore-go stores the TSA's HTTP
// response body).
function makeTSA(prefix) {
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];
  openssl('req', '-x509', '-new', ...ec, '-keyout', `${prefix}ca.key`, '-out', `${prefix}ca.pem`,
    '-subj', `/CN=${prefix}selftest TSA root`, '-days', '2',
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign');
  openssl('req', '-new', ...ec, '-keyout', `${prefix}tsa.key`, '-out', `${prefix}tsa.csr`,
    '-subj', `/CN=${prefix}selftest TSA`);
  file(`${prefix}tsa.ext`, 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=critical,timeStamping\n');
  openssl('x509', '-req', '-in', `${prefix}tsa.csr`, '-CA', `${prefix}ca.pem`, '-CAkey', `${prefix}ca.key`,
    '-set_serial', '4242', '-days', '1', '-extfile', `${prefix}tsa.ext`, '-out', `${prefix}tsa.pem`);
  file(`${prefix}serial`, '01\n');
  const cnf = file(`${prefix}tsa.cnf`, [
    '[tsa]', 'default_tsa = tsa1', '[tsa1]',
    `serial = ${join(dir, `${prefix}serial`)}`,
    `signer_cert = ${join(dir, `${prefix}tsa.pem`)}`,
    `signer_key = ${join(dir, `${prefix}tsa.key`)}`,
    `certs = ${join(dir, `${prefix}ca.pem`)}`,
    'signer_digest = sha256', 'default_policy = 1.3.6.1.4.1.57264.99.1', 'digests = sha256',
    'accuracy = secs:1', 'ess_cert_id_alg = sha256', '',
  ].join('\n'));
  // Leaf first, then its CA: the order verify.mjs --tsa-chain expects.
  const chain = file(`${prefix}chain.pem`,
    readFileSync(join(dir, `${prefix}tsa.pem`), 'utf8') + readFileSync(join(dir, `${prefix}ca.pem`), 'utf8'));
  let n = 0;
  const stamp = (sha256hex) => {
    n++;
    openssl('ts', '-query', '-digest', sha256hex, '-sha256', '-cert', '-out', `${prefix}q${n}.tsq`);
    openssl('ts', '-reply', '-config', cnf, '-queryfile', `${prefix}q${n}.tsq`, '-out', `${prefix}r${n}.tsr`);
    return readFileSync(join(dir, `${prefix}r${n}.tsr`));
  };
  // The bare TimeStampToken (CMS ContentInfo) without the TimeStampResp status.
  const tokenOnly = (resp) => {
    const inPath = file(`${prefix}resp${++n}.tsr`, resp);
    openssl('ts', '-reply', '-in', inPath, '-token_out', '-out', `${prefix}tok${n}.der`);
    return readFileSync(join(dir, `${prefix}tok${n}.der`));
  };
  return { chain, stamp, tokenOnly };
}

function withTimestamps(bundle, tokens) {
  const b = structuredClone(bundle);
  b.verificationMaterial.timestampVerificationData = {
    rfc3161Timestamps: tokens.map((t) => ({ signedTimestamp: t.toString('base64') })),
  };
  return b;
}

const sha256hex = (b) => createHash('sha256').update(b).digest('hex');

// --- key-signed bundle, no timestamps ---
const key = newKey();
const other = newKey();
const keyPem = file('key.pem', key.pem);
const otherPem = file('other.pem', other.pem);
const { bundle: good, sig: goodSig } = makeBundle(key);
const goodPath = file('good.json', JSON.stringify(good));

expectOk('correct bundle verifies', ['--bundle', goodPath, '--key', keyPem], (j) => {
  assert(j.payloadType === PAYLOAD_TYPE, `payloadType ${j.payloadType}`);
  assert(j.predicateType === 'https://slsa.dev/provenance/v1', `predicateType ${j.predicateType}`);
  assert(j.subjects.length === 1 && j.subjects[0].digest.sha256 === IMAGE_DIGEST, `subjects ${JSON.stringify(j.subjects)}`);
  assert(j.subjects[0].annotations['dev.keybroker.caller'] === 'uid=1000', 'annotations not reported');
  assert(j.timestamps === 0, `timestamps ${j.timestamps}`);
  assert(j.hint === key.hint && j.hintIsCosignKeyDigest === true, `hint ${j.hint} ${j.hintIsCosignKeyDigest}`);
});
expectOk('correct bundle with matching --digest', ['--bundle', goodPath, '--key', keyPem, '--digest', `sha256:${IMAGE_DIGEST}`]);
expectFail('wrong key', ['--bundle', goodPath, '--key', otherPem], /signature verification failed/);

const tampered = structuredClone(good);
tampered.dsseEnvelope.payload = Buffer.from(JSON.stringify(statement(sha256hex('another image')))).toString('base64');
expectFail('tampered payload', ['--bundle', file('tampered.json', JSON.stringify(tampered)), '--key', keyPem], /signature verification failed/);

const retyped = structuredClone(good);
retyped.dsseEnvelope.payloadType = 'application/json';
expectFail('changed payloadType', ['--bundle', file('retyped.json', JSON.stringify(retyped)), '--key', keyPem], /signature verification failed/);

expectFail('wrong --digest', ['--bundle', goodPath, '--key', keyPem, '--digest', `sha256:${sha256hex('x')}`], /no subject has digest/);

const noMedia = structuredClone(good);
delete noMedia.mediaType;
expectFail('missing mediaType', ['--bundle', file('nomedia.json', JSON.stringify(noMedia)), '--key', keyPem], /invalid bundle/);

const twoSigs = structuredClone(good);
twoSigs.dsseEnvelope.signatures.push(twoSigs.dsseEnvelope.signatures[0]);
expectFail('two DSSE signatures', ['--bundle', file('twosigs.json', JSON.stringify(twoSigs)), '--key', keyPem], /invalid bundle/);

// sigstore-js looks keys up by the hint string only, so any hint verifies with
// the right key; verify.mjs reports whether it is cosign's hint.
const { bundle: otherHint } = makeBundle(key, { hint: 'not-the-cosign-hint' });
expectOk('non-cosign hint is reported', ['--bundle', file('otherhint.json', JSON.stringify(otherHint)), '--key', keyPem],
  (j) => assert(j.hintIsCosignKeyDigest === false, 'hintIsCosignKeyDigest should be false'));

// Absent tlogEntries is read as [] by protobuf-specs; cosign's protojson output omits it.
const noTlog = structuredClone(good);
delete noTlog.verificationMaterial.tlogEntries;
expectOk('absent tlogEntries', ['--bundle', file('notlog.json', JSON.stringify(noTlog)), '--key', keyPem]);

for (const [name, args] of [
  ['missing --key', ['--bundle', goodPath]],
  ['unknown flag', ['--bundle', goodPath, '--key', keyPem, '--verbose']],
  ['bad --digest', ['--bundle', goodPath, '--key', keyPem, '--digest', 'sha256:abc']],
  ['unreadable --key', ['--bundle', goodPath, '--key', join(dir, 'nonexistent.pem')]],
  ['--key not a key', ['--bundle', goodPath, '--key', goodPath]],
  ['--tsa-chain without certificates', ['--bundle', goodPath, '--key', keyPem, '--tsa-chain', keyPem]],
]) {
  const r = run(args);
  if (r.code !== 2) fail(`${name}: expected usage error exit 2, got ${r.code}: ${r.stdout}${r.stderr}`);
  checks++;
  console.log(`ok   ${name} is a usage error (exit 2)`);
}

// --- RFC 3161 timestamps ---
const tsa = makeTSA('a-');
const foreignTSA = makeTSA('b-');
// The token stamps sha256(raw DSSE signature bytes), as sigstore-go's
// TimestampAuthority.GetTimestamp does and @sigstore/verify checks.
const stamped = withTimestamps(good, [tsa.stamp(sha256hex(goodSig))]);
const stampedPath = file('stamped.json', JSON.stringify(stamped));

expectOk('timestamped bundle with --tsa-chain', ['--bundle', stampedPath, '--key', keyPem, '--tsa-chain', tsa.chain],
  (j) => assert(j.timestamps === 1, `timestamps ${j.timestamps}`));
expectFail('timestamped bundle without --tsa-chain', ['--bundle', stampedPath, '--key', keyPem], /timestamp could not be verified/);
expectFail('timestamp from an untrusted TSA', ['--bundle', stampedPath, '--key', keyPem, '--tsa-chain', foreignTSA.chain], /timestamp could not be verified/);
expectFail('no timestamp but --tsa-chain', ['--bundle', goodPath, '--key', keyPem, '--tsa-chain', tsa.chain], /expected 1 timestamps, got 0/);

// signedTimestamp holds the whole TimeStampResp; a bare token is not accepted.
const bare = withTimestamps(good, [tsa.tokenOnly(tsa.stamp(sha256hex(goodSig)))]);
expectFail('bare TimeStampToken instead of TimeStampResp', ['--bundle', file('bare.json', JSON.stringify(bare)), '--key', keyPem, '--tsa-chain', tsa.chain]);

// A token over the wrong bytes: sha256 of the PAE instead of the signature.
const goodPae = pae(PAYLOAD_TYPE, Buffer.from(good.dsseEnvelope.payload, 'base64'));
const overPae = withTimestamps(good, [tsa.stamp(sha256hex(goodPae))]);
expectFail('timestamp over the PAE, not the signature', ['--bundle', file('overpae.json', JSON.stringify(overPae)), '--key', keyPem, '--tsa-chain', tsa.chain], /timestamp could not be verified/);

// The good token moved onto a bundle of the same statement with another
// signature (ECDSA signatures are randomized).
const { bundle: resigned, sig: resignedSig } = makeBundle(key);
assert(!resignedSig.equals(goodSig), 'two ECDSA signatures were equal');
const moved = withTimestamps(resigned, [tsa.stamp(sha256hex(goodSig))]);
expectFail('timestamp for another signature', ['--bundle', file('moved.json', JSON.stringify(moved)), '--key', keyPem, '--tsa-chain', tsa.chain], /timestamp could not be verified/);

console.log(`selftest: ${checks} checks passed`);
rmSync(dir, { recursive: true, force: true });

#!/usr/bin/env python3
# A FAKE Google Cloud KMS: a small gRPC server on 127.0.0.1 standing in for
# cloudkms.googleapis.com in keybroker's tests. It is written from Google's
# published google.cloud.kms.v1 API and speaks it with the message classes of
# Google's own Python client (PyPI google-cloud-kms: google.cloud.kms_v1.types,
# proto-plus), so the wire format comes from Google's generated code and not
# from keybroker's .proto. Only the RPCs keybroker calls are implemented:
# ListCryptoKeyVersions, GetCryptoKeyVersion, GetPublicKey, AsymmetricSign,
# CreateCryptoKey.
#
# Like the real service it holds real keys (P-256 / P-384, `cryptography`),
# checks the bearer token of every call (UNAUTHENTICATED otherwise), checks the
# digest_crc32c a client sends (INVALID_ARGUMENT on mismatch) and answers with
# signature_crc32c / verified_digest_crc32c / pem_crc32c.
#
# A plain-HTTP port serves:
#   POST /token  OAuth token endpoint: the jwt-bearer grant (the RS256 JWT is
#                verified with the service account's public key; iss, aud, scope,
#                iat/exp checked) and the refresh_token grant.
#   GET  /computeMetadata/v1/instance/service-accounts/default/token
#                the GCE metadata server's token call (Metadata-Flavor: Google).
#   POST /control/...  test control (JSON in, JSON out):
#       create_key {name, algorithm?, versions?}  a key with N ENABLED versions
#       add_version {key}          a new ENABLED version (rotation); returns it
#       set_state {version, state} ENABLED / DISABLED / DESTROYED
#       corrupt {key, kind, count?}  corrupt the next `count` replies of a kind
#                                  about that key:
#           signature_crc32c, verified_digest_crc32c, sign_name (AsymmetricSign),
#           signature (bad bytes with a matching CRC), pem_crc32c, pem_name
#       max_page_size {key, n}     cap ListCryptoKeyVersions pages of a key
#       revoke_tokens {}           every issued access token becomes invalid
#       deny {key}                 PERMISSION_DENIED for calls on that key
#       stats {key?}               call counters (global, or one key's)
# At start it writes into --state-dir: service_account.json (token_uri = this
# server), wrong_service_account.json (same account, another private key),
# authorized_user.json. Binds 127.0.0.1 only. Logs no token or key.
import argparse
import base64
import json
import os
import secrets
import sys
import threading
import time
import urllib.parse
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from google.cloud.kms_v1 import types

SERVICE = "google.cloud.kms.v1.KeyManagementService"
EMAIL = "keybroker-test@fake-project.iam.gserviceaccount.com"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
SCOPES = ("https://www.googleapis.com/auth/cloud-platform", "https://www.googleapis.com/auth/cloudkms")

Alg = types.CryptoKeyVersion.CryptoKeyVersionAlgorithm
State = types.CryptoKeyVersion.CryptoKeyVersionState
CURVES = {Alg.EC_SIGN_P256_SHA256: (ec.SECP256R1(), hashes.SHA256(), 32),
          Alg.EC_SIGN_P384_SHA384: (ec.SECP384R1(), hashes.SHA384(), 48)}


def _crc_table():
    t = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        t.append(c)
    return t


CRC_TABLE = _crc_table()


def crc32c(data):
    c = 0xFFFFFFFF
    for b in data:
        c = CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def b64url_decode(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


class Version:
    def __init__(self, name, algorithm, state=State.ENABLED):
        curve = CURVES[algorithm][0]
        self.name, self.algorithm, self.state = name, algorithm, state
        self.key = ec.generate_private_key(curve)
        self.pem = self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    def message(self):
        return types.CryptoKeyVersion(name=self.name, state=self.state, algorithm=self.algorithm,
                                      protection_level=types.ProtectionLevel.SOFTWARE)


class Kms:
    def __init__(self):
        self.lock = threading.Lock()
        self.keys = {}  # key name -> {"algorithm": Alg, "versions": [Version]}
        self.tokens = set()
        self.corrupt = {}  # (key, kind) -> remaining count
        self.key_stats = {}  # key -> {counter: n}
        self.max_page = {}  # key -> largest page
        self.denied = set()
        self.stats = {"AsymmetricSign": 0, "GetPublicKey": 0, "ListCryptoKeyVersions": 0,
                      "GetCryptoKeyVersion": 0, "CreateCryptoKey": 0, "bad_digest_crc32c": 0,
                      "unauthenticated": 0, "token_issued": 0, "token_refused": 0}

    # -- control -------------------------------------------------------------
    def create_key(self, name, algorithm="EC_SIGN_P256_SHA256", versions=1, pending=False):
        alg = Alg[algorithm]
        with self.lock:
            if name in self.keys:
                raise KeyError(f"{name} already exists")
            self.keys[name] = {"algorithm": alg, "versions": []}
        for _ in range(versions):
            self.add_version(name, State.PENDING_GENERATION if pending else State.ENABLED)
        return [v.name for v in self.keys[name]["versions"]]

    def add_version(self, key, state=State.ENABLED):
        with self.lock:
            k = self.keys[key]
            n = len(k["versions"]) + 1
            v = Version(f"{key}/cryptoKeyVersions/{n}", k["algorithm"], state)
            k["versions"].append(v)
        return v.name

    def take_corruption(self, key, kind):
        with self.lock:
            n = self.corrupt.get((key, kind), 0)
            if n > 0:
                self.corrupt[(key, kind)] = n - 1
                return True
            return False

    def count(self, what, key=None):
        with self.lock:
            self.stats[what] += 1
            if key is not None:
                per = self.key_stats.setdefault(key, {})
                per[what] = per.get(what, 0) + 1

    # -- lookups -------------------------------------------------------------
    def version(self, name, context):
        key, sep, _ = name.rpartition("/cryptoKeyVersions/")
        self.check_key_access(key, context)
        with self.lock:
            k = self.keys.get(key)
            v = next((v for v in k["versions"] if v.name == name), None) if k and sep else None
        if v is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"{name} not found.")
        return v

    def check_key_access(self, key, context):
        if key in self.denied:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"Permission 'cloudkms.cryptoKeyVersions.useToSign' denied on resource '{key}' (or it may not exist).")

    def authenticate(self, context):
        md = dict(context.invocation_metadata())
        auth = md.get("authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        with self.lock:
            ok = token is not None and token in self.tokens
        if not ok:
            self.count("unauthenticated")
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "Request had invalid authentication credentials. Expected OAuth 2 access token.")


def grpc_handlers(kms):
    def key_of(request):
        if getattr(request, "crypto_key_id", ""):
            return f"{request.parent}/cryptoKeys/{request.crypto_key_id}"
        if getattr(request, "parent", ""):
            return request.parent
        return request.name.rpartition("/cryptoKeyVersions/")[0]

    def wrap(method, fn):
        def handler(request, context):
            kms.authenticate(context)
            kms.count(method, key_of(request))
            return fn(request, context)
        return handler

    def list_versions(req, context):
        kms.check_key_access(req.parent, context)
        with kms.lock:
            k = kms.keys.get(req.parent)
            versions = list(k["versions"]) if k else None
            cap = kms.max_page.get(req.parent, 1000)
        if versions is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"{req.parent} not found.")
        if req.filter:
            field, _, value = req.filter.partition("=")
            if field.strip() != "state" or value.strip() not in State.__members__:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Invalid filter: {req.filter}")
            versions = [v for v in versions if v.state == State[value.strip()]]
        start = int(req.page_token) if req.page_token else 0
        size = min(req.page_size or 1000, cap)
        page = versions[start:start + size]
        nxt = str(start + size) if start + size < len(versions) else ""
        return types.ListCryptoKeyVersionsResponse(
            crypto_key_versions=[v.message() for v in page], next_page_token=nxt,
            total_size=len(versions))

    def get_version(req, context):
        return kms.version(req.name, context).message()

    def get_public_key(req, context):
        v = kms.version(req.name, context)
        if v.state not in (State.ENABLED, State.DISABLED):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"{v.name} is not in state ENABLED, current state is {State(v.state).name}.")
        pem = v.pem
        crc = crc32c(pem.encode())
        name = v.name
        key = v.name.rpartition("/cryptoKeyVersions/")[0]
        if kms.take_corruption(key, "pem_crc32c"):
            crc ^= 1
        if kms.take_corruption(key, "pem_name"):
            name = v.name.rsplit("/", 1)[0] + "/999"
        return types.PublicKey(pem=pem, algorithm=v.algorithm, pem_crc32c=crc, name=name,
                               protection_level=types.ProtectionLevel.SOFTWARE)

    def asymmetric_sign(req, context):
        v = kms.version(req.name, context)
        if v.state != State.ENABLED:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"{v.name} is not in state ENABLED, current state is {State(v.state).name}.")
        curve, hash_alg, size = CURVES[v.algorithm]
        which = types.Digest.pb(req.digest).WhichOneof("digest")
        digest = getattr(req.digest, which) if which else b""
        if which != {32: "sha256", 48: "sha384"}[size] or len(digest) != size:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"The digest must be a {hash_alg.name} digest of {size} bytes for {Alg(v.algorithm).name}.")
        has_crc = types.AsymmetricSignRequest.pb(req).HasField("digest_crc32c")
        if has_crc and req.digest_crc32c != crc32c(digest):
            kms.count("bad_digest_crc32c", v.name.rpartition("/cryptoKeyVersions/")[0])
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "The checksum in field digest_crc32c did not match the data in field digest.")
        sig = v.key.sign(digest, ec.ECDSA(Prehashed(hash_alg)))
        key = v.name.rpartition("/cryptoKeyVersions/")[0]
        if kms.take_corruption(key, "signature"):
            # Valid DER, wrong signature: r and s of a signature over other bytes.
            sig = v.key.sign(bytes(size), ec.ECDSA(Prehashed(hash_alg)))
        crc = crc32c(sig)
        verified = has_crc
        name = v.name
        if kms.take_corruption(key, "signature_crc32c"):
            crc ^= 1
        if kms.take_corruption(key, "verified_digest_crc32c"):
            verified = False
        if kms.take_corruption(key, "sign_name"):
            name = v.name.rsplit("/", 1)[0] + "/999"
        return types.AsymmetricSignResponse(signature=sig, signature_crc32c=crc,
                                            verified_digest_crc32c=verified, name=name,
                                            protection_level=types.ProtectionLevel.SOFTWARE)

    def create_crypto_key(req, context):
        key = f"{req.parent}/cryptoKeys/{req.crypto_key_id}"
        if req.crypto_key.purpose != types.CryptoKey.CryptoKeyPurpose.ASYMMETRIC_SIGN:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the fake creates ASYMMETRIC_SIGN keys only")
        alg = req.crypto_key.version_template.algorithm
        if alg not in CURVES:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unsupported algorithm {alg}")
        try:
            kms.create_key(key, Alg(alg).name, 0 if req.skip_initial_version_creation else 1, pending=True)
        except KeyError:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, f"{key} already exists.")

        def generated():  # asymmetric versions are generated asynchronously
            time.sleep(0.3)
            with kms.lock:
                for v in kms.keys[key]["versions"]:
                    if v.state == State.PENDING_GENERATION:
                        v.state = State.ENABLED
        threading.Thread(target=generated, daemon=True).start()
        return types.CryptoKey(name=key, purpose=req.crypto_key.purpose,
                               version_template=req.crypto_key.version_template)

    t = types
    table = {
        "ListCryptoKeyVersions": (list_versions, t.ListCryptoKeyVersionsRequest, t.ListCryptoKeyVersionsResponse),
        "GetCryptoKeyVersion": (get_version, t.GetCryptoKeyVersionRequest, t.CryptoKeyVersion),
        "GetPublicKey": (get_public_key, t.GetPublicKeyRequest, t.PublicKey),
        "AsymmetricSign": (asymmetric_sign, t.AsymmetricSignRequest, t.AsymmetricSignResponse),
        "CreateCryptoKey": (create_crypto_key, t.CreateCryptoKeyRequest, t.CryptoKey),
    }
    return grpc.method_handlers_generic_handler(SERVICE, {
        name: grpc.unary_unary_rpc_method_handler(
            wrap(name, fn), request_deserializer=req.deserialize, response_serializer=resp.serialize)
        for name, (fn, req, resp) in table.items()
    })


def make_http_handler(kms, sa_public, token_uri, user):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):  # request lines only
            sys.stderr.write("http: %s %s\n" % (self.command, self.path.split("?")[0]))

        def reply(self, code, obj):
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def issue(self):
            token = "ya29.fake-" + secrets.token_urlsafe(24)
            with kms.lock:
                kms.tokens.add(token)
                kms.stats["token_issued"] += 1
            self.reply(200, {"access_token": token, "expires_in": 3599, "token_type": "Bearer"})

        def refuse(self, error, description):
            kms.count("token_refused")
            self.reply(400, {"error": error, "error_description": description})

        def do_GET(self):
            if self.path == "/computeMetadata/v1/instance/service-accounts/default/token":
                if self.headers.get("Metadata-Flavor") != "Google":
                    return self.reply(403, {"error": "missing Metadata-Flavor: Google"})
                return self.issue()
            self.reply(404, {"error": "not found"})

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path == "/token":
                return self.token(urllib.parse.parse_qs(body.decode()))
            if self.path.startswith("/control/"):
                try:
                    return self.reply(200, control(kms, self.path[len("/control/"):], json.loads(body or b"{}")))
                except (KeyError, ValueError) as e:
                    return self.reply(400, {"error": str(e)})
            self.reply(404, {"error": "not found"})

        def token(self, form):
            grant = form.get("grant_type", [""])[0]
            if grant == "refresh_token":
                got = {k: form.get(k, [""])[0] for k in ("client_id", "client_secret", "refresh_token")}
                if got != user:
                    return self.refuse("invalid_grant", "Bad Request")
                return self.issue()
            if grant != JWT_BEARER:
                return self.refuse("unsupported_grant_type", f"Invalid grant_type: {grant}")
            jwt = form.get("assertion", [""])[0]
            try:
                h, c, s = jwt.split(".")
                header, claims = json.loads(b64url_decode(h)), json.loads(b64url_decode(c))
                sa_public.verify(b64url_decode(s), f"{h}.{c}".encode(), padding.PKCS1v15(), hashes.SHA256())
            except InvalidSignature:
                return self.refuse("invalid_grant", "Invalid JWT Signature.")
            except ValueError:
                return self.refuse("invalid_grant", "Invalid JWT.")
            now = time.time()
            if header.get("alg") != "RS256":
                return self.refuse("invalid_grant", "Invalid JWT: alg must be RS256.")
            if claims.get("iss") != EMAIL:
                return self.refuse("invalid_grant", "Invalid JWT: unknown issuer.")
            if claims.get("aud") != token_uri:
                return self.refuse("invalid_grant", "Invalid JWT: audience is not the token URI.")
            if not set(str(claims.get("scope", "")).split()) & set(SCOPES):
                return self.refuse("invalid_scope", "Invalid JWT: no Cloud KMS scope.")
            iat, exp = claims.get("iat", 0), claims.get("exp", 0)
            if not (iat <= now + 60 and exp > now and exp - iat <= 3600):
                return self.refuse("invalid_grant", "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe.")
            self.issue()

    return Handler


def control(kms, op, arg):
    if op == "create_key":
        return {"versions": kms.create_key(arg["name"], arg.get("algorithm", "EC_SIGN_P256_SHA256"),
                                           int(arg.get("versions", 1)))}
    if op == "add_version":
        return {"version": kms.add_version(arg["key"])}
    if op == "set_state":
        with kms.lock:
            key = arg["version"].rpartition("/cryptoKeyVersions/")[0]
            v = next(v for v in kms.keys[key]["versions"] if v.name == arg["version"])
            v.state = State[arg["state"]]
        return {}
    if op == "corrupt":
        with kms.lock:
            kms.corrupt[(arg["key"], arg["kind"])] = int(arg.get("count", 1))
        return {}
    if op == "max_page_size":
        with kms.lock:
            kms.max_page[arg["key"]] = int(arg["n"])
        return {}
    if op == "revoke_tokens":
        with kms.lock:
            kms.tokens.clear()
        return {}
    if op == "deny":
        with kms.lock:
            kms.denied.add(arg["key"])
        return {}
    if op == "stats":  # global, or of one key's RPCs
        with kms.lock:
            return dict(kms.key_stats.get(arg["key"], {})) if "key" in arg else dict(kms.stats)
    raise KeyError(f"unknown control operation {op}")


def write_json(path, obj):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--grpc-port", type=int, required=True)
    ap.add_argument("--http-port", type=int, required=True)
    ap.add_argument("--state-dir", required=True)
    args = ap.parse_args()
    kms = Kms()
    token_uri = f"http://127.0.0.1:{args.http_port}/token"

    def sa_file(key, key_id):
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
        return {"type": "service_account", "project_id": "fake-project", "private_key_id": key_id,
                "private_key": pem, "client_email": EMAIL, "client_id": "1234567890",
                "auth_uri": "https://accounts.google.com/o/oauth2/auth", "token_uri": token_uri}

    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    wrong_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    user = {"client_id": "fake-client.apps.googleusercontent.com",
            "client_secret": secrets.token_urlsafe(16), "refresh_token": "1//" + secrets.token_urlsafe(32)}
    write_json(os.path.join(args.state_dir, "service_account.json"), sa_file(sa_key, secrets.token_hex(20)))
    write_json(os.path.join(args.state_dir, "wrong_service_account.json"), sa_file(wrong_key, secrets.token_hex(20)))
    write_json(os.path.join(args.state_dir, "authorized_user.json"),
               dict(user, type="authorized_user", token_uri=token_uri))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((grpc_handlers(kms),))
    if server.add_insecure_port(f"127.0.0.1:{args.grpc_port}") == 0:
        sys.exit(f"cannot bind 127.0.0.1:{args.grpc_port}")
    server.start()
    http = ThreadingHTTPServer(("127.0.0.1", args.http_port),
                               make_http_handler(kms, sa_key.public_key(), token_uri, user))
    threading.Thread(target=http.serve_forever, daemon=True).start()
    print(f"fake Cloud KMS: grpc 127.0.0.1:{args.grpc_port}, http 127.0.0.1:{args.http_port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()

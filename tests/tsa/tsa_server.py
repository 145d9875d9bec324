#!/usr/bin/env python3
# A real, local RFC 3161 Time-Stamp Authority for keybroker's tests. It stands
# in for a TSA such as sigstore's timestamp-authority or FreeTSA: the tokens
# are made by `openssl ts -reply` (OpenSSL's TSA implementation, the same code
# many production TSAs run), signed by a TSA certificate from a test CA that
# this server creates at start. Only the HTTP wrapper (RFC 3161 §3.4: POST an
# application/timestamp-query, get an application/timestamp-reply) is ours.
#
# At start it writes into --state-dir:
#   root.pem / root.key      test root CA (EC P-256, CA:true)
#   tsa.pem / tsa.key        TSA leaf (EC P-256, extendedKeyUsage = critical,timeStamping)
#   chain.pem                tsa.pem then root.pem (what a verifier's trusted root holds)
#   rogue-root.pem, rogue-tsa.pem  a second CA and TSA nobody trusts (mode "untrusted")
#   openssl-ts.cnf           the `openssl ts` config (sha256, policy OID,
#                            ess_cert_id_alg sha256, certificates included)
#   port                     the HTTP port, once it listens
#
# HTTP on 127.0.0.1 only:
#   POST /               the TSA (also /api/v1/timestamp, sigstore's path)
#   POST /control/fail-next  {"mode": M, "count": N}: the next N timestamp
#                        requests are answered wrongly. Modes:
#       http500          HTTP 500 with a text body
#       garbage          HTTP 200, application/timestamp-reply, random bytes
#       rejection        a well-formed TimeStampResp with status rejection (2)
#       wrong-imprint    a granted token over another digest (the nonce is right)
#       wrong-nonce      a granted token with another nonce (the imprint is right)
#       untrusted        a granted token signed by the rogue TSA
#       slow             answers correctly after "delay" seconds (default 30)
#   POST /control/stats  {"requests": N, "failed": N, "pending": [...]}
#   POST /control/reset  drops pending failures
# Keys never leave the state dir; nothing secret is logged.
import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

POLICY_OID = "1.3.6.1.4.1.99999.3161.1"
MAX_QUERY = 16 * 1024


def run(*args, cwd=None):
    r = subprocess.run(args, cwd=cwd, capture_output=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])}: {r.stderr.decode(errors='replace').strip()}")
    return r.stdout


def make_ca(d, name, cn):
    """A self-signed EC P-256 root CA: name.key, name.pem."""
    ext = os.path.join(d, f"{name}.ext")
    with open(ext, "w") as f:
        f.write("[req]\ndistinguished_name = dn\n[dn]\n"
                "[v3]\nbasicConstraints = critical,CA:true\n"
                "keyUsage = critical,keyCertSign,cRLSign\n"
                "subjectKeyIdentifier = hash\n")
    run("openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{d}/{name}.key")
    run("openssl", "req", "-new", "-x509", "-key", f"{d}/{name}.key", "-out", f"{d}/{name}.pem",
        "-days", "3650", "-subj", f"/O=keybroker test/CN={cn}", "-sha256",
        "-config", ext, "-extensions", "v3")


def make_tsa(d, name, ca, cn):
    """A TSA leaf signed by `ca`: critical timeStamping EKU, as RFC 3161 §2.3 requires."""
    ext = os.path.join(d, f"{name}.ext")
    with open(ext, "w") as f:
        f.write("[req]\ndistinguished_name = dn\n[dn]\n"
                "[v3]\nbasicConstraints = critical,CA:false\n"
                "keyUsage = critical,digitalSignature,nonRepudiation\n"
                "extendedKeyUsage = critical,timeStamping\n"
                "subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n")
    run("openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{d}/{name}.key")
    run("openssl", "req", "-new", "-key", f"{d}/{name}.key", "-out", f"{d}/{name}.csr",
        "-subj", f"/O=keybroker test/CN={cn}", "-config", ext)
    run("openssl", "x509", "-req", "-in", f"{d}/{name}.csr", "-CA", f"{d}/{ca}.pem",
        "-CAkey", f"{d}/{ca}.key", "-set_serial", str(secrets.randbits(63)), "-days", "3650",
        "-sha256", "-extfile", ext, "-extensions", "v3", "-out", f"{d}/{name}.pem")


def ts_config(d):
    sections = []
    for section, cert, key, ca in (("tsa_config", "tsa", "tsa", "root"),
                                   ("rogue_config", "rogue-tsa", "rogue-tsa", "rogue-root")):
        sections.append(f"""
[ {section} ]
dir = {d}
serial = $dir/serial
crypto_device = builtin
signer_cert = $dir/{cert}.pem
signer_key = $dir/{key}.key
certs = $dir/{ca}.pem
signer_digest = sha256
default_policy = {POLICY_OID}
other_policies = {POLICY_OID}.2
digests = sha256, sha384, sha512
accuracy = secs:1
ordering = yes
tsa_name = yes
ess_cert_id_chain = no
ess_cert_id_alg = sha256
""")
    with open(os.path.join(d, "openssl-ts.cnf"), "w") as f:
        f.write("[ tsa ]\ndefault_tsa = tsa_config\n" + "".join(sections))
    with open(os.path.join(d, "serial"), "w") as f:
        f.write("01\n")


# -- minimal DER, to alter a query for the wrong-imprint / wrong-nonce modes --

def der_read(b, i):
    """(tag, header_len, content_len) of the TLV at b[i]."""
    tag = b[i]
    n = b[i + 1]
    if n < 0x80:
        return tag, 2, n
    k = n & 0x7F
    return tag, 2 + k, int.from_bytes(b[i + 2:i + 2 + k], "big")


def der_children(b):
    out, i = [], 0
    while i < len(b):
        _, h, n = der_read(b, i)
        out.append(b[i:i + h + n])
        i += h + n
    return out


def der_len(n):
    if n < 0x80:
        return bytes([n])
    s = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(s)]) + s


def der_tlv(tag, content):
    return bytes([tag]) + der_len(len(content)) + content


def der_content(tlv):
    _, h, n = der_read(tlv, 0)
    return tlv[h:h + n]


def alter_query(query, what):
    """The TimeStampReq with its digest (what="imprint") or nonce changed."""
    fields = der_children(der_content(query))
    for j, f in enumerate(fields):
        if what == "imprint" and f[0] == 0x30:  # messageImprint
            alg, digest = der_children(der_content(f))
            d = bytearray(der_content(digest))
            d[-1] ^= 0x01
            fields[j] = der_tlv(0x30, alg + der_tlv(0x04, bytes(d)))
            break
        if what == "nonce" and f[0] == 0x02 and j > 0:  # nonce (j 0 is version)
            n = bytearray(der_content(f))
            n[-1] ^= 0x01
            fields[j] = der_tlv(0x02, bytes(n))
            break
    return der_tlv(0x30, b"".join(fields))


def rejection():
    """TimeStampResp { status { rejection, statusString } } (RFC 3161 §2.4.2)."""
    text = b"keybroker test TSA: rejected on request"
    free_text = der_tlv(0x30, der_tlv(0x0C, text))
    return der_tlv(0x30, der_tlv(0x30, der_tlv(0x02, b"\x02") + free_text))


class Tsa:
    def __init__(self, state_dir):
        self.dir = state_dir
        self.lock = threading.Lock()
        self.pending = []  # [mode, remaining, delay]
        self.requests = 0
        self.failed = 0

    def take_mode(self):
        with self.lock:
            self.requests += 1
            if not self.pending:
                return None, 0
            p = self.pending[0]
            p[1] -= 1
            if p[1] <= 0:
                self.pending.pop(0)
            self.failed += 1
            return p[0], p[2]

    def reply(self, query, section="tsa_config"):
        with self.lock, tempfile.TemporaryDirectory(dir=self.dir) as t:
            q = os.path.join(t, "q.tsq")
            r = os.path.join(t, "r.tsr")
            with open(q, "wb") as f:
                f.write(query)
            run("openssl", "ts", "-reply", "-config", f"{self.dir}/openssl-ts.cnf",
                "-section", section, "-queryfile", q, "-out", r)
            with open(r, "rb") as f:
                return f.read()


class Handler(BaseHTTPRequestHandler):
    server_version = "keybroker-test-tsa"
    tsa = None

    def log_message(self, fmt, *args):
        sys.stderr.write("tsa: " + (fmt % args) + "\n")

    def send(self, code, body, ctype):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.send(405, b"POST a timestamp query\n", "text/plain")

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n > MAX_QUERY:
            return self.send(413, b"query too large\n", "text/plain")
        body = self.rfile.read(n)
        path = self.path.split("?")[0]
        if path.startswith("/control/"):
            return self.control(path[len("/control/"):], body)
        if path not in ("/", "/api/v1/timestamp"):
            return self.send(404, b"not found\n", "text/plain")
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/timestamp-query":
            return self.send(415, b"Content-Type must be application/timestamp-query\n", "text/plain")
        mode, delay = self.tsa.take_mode()
        try:
            if mode == "http500":
                return self.send(500, b"test TSA: internal error on request\n", "text/plain")
            if mode == "garbage":
                return self.send(200, secrets.token_bytes(200), "application/timestamp-reply")
            if mode == "rejection":
                return self.send(200, rejection(), "application/timestamp-reply")
            if mode == "slow":
                time.sleep(delay)
            query, section = body, "tsa_config"
            if mode == "wrong-imprint":
                query = alter_query(body, "imprint")
            elif mode == "wrong-nonce":
                query = alter_query(body, "nonce")
            elif mode == "untrusted":
                section = "rogue_config"
            resp = self.tsa.reply(query, section)
        except Exception as e:  # a malformed query: openssl refuses it
            return self.send(400, f"bad timestamp query: {e}\n".encode(), "text/plain")
        self.send(200, resp, "application/timestamp-reply")

    def control(self, op, body):
        try:
            arg = json.loads(body or b"{}")
        except ValueError:
            return self.send(400, b"JSON body expected\n", "text/plain")
        t = self.tsa
        with t.lock:
            if op == "fail-next":
                mode = arg.get("mode")
                if mode not in ("http500", "garbage", "rejection", "wrong-imprint",
                                "wrong-nonce", "untrusted", "slow"):
                    return self.send(400, f"unknown mode {mode!r}\n".encode(), "text/plain")
                t.pending.append([mode, int(arg.get("count", 1)), float(arg.get("delay", 30))])
            elif op == "reset":
                t.pending.clear()
            elif op != "stats":
                return self.send(404, b"unknown control operation\n", "text/plain")
            out = {"requests": t.requests, "failed": t.failed,
                   "pending": [{"mode": m, "count": c} for m, c, _ in t.pending]}
        self.send(200, json.dumps(out).encode(), "application/json")


def main():
    ap = argparse.ArgumentParser(description="A local RFC 3161 TSA for keybroker's tests")
    ap.add_argument("--state-dir", required=True)
    ap.add_argument("--port", type=int, default=0)
    a = ap.parse_args()
    d = os.path.abspath(a.state_dir)
    os.makedirs(d, exist_ok=True)
    make_ca(d, "root", "keybroker test TSA root")
    make_tsa(d, "tsa", "root", "keybroker test TSA")
    make_ca(d, "rogue-root", "rogue TSA root")
    make_tsa(d, "rogue-tsa", "rogue-root", "rogue TSA")
    with open(f"{d}/chain.pem", "w") as out:
        for name in ("tsa", "root"):
            with open(f"{d}/{name}.pem") as f:
                out.write(f.read())
    ts_config(d)
    Handler.tsa = Tsa(d)
    httpd = ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    port = httpd.server_address[1]
    with open(f"{d}/port.tmp", "w") as f:
        f.write(str(port))
    os.replace(f"{d}/port.tmp", f"{d}/port")
    sys.stderr.write(f"tsa: listening on 127.0.0.1:{port}\n")
    httpd.serve_forever()


if __name__ == "__main__":
    main()

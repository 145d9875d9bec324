#!/usr/bin/env python3
# Stands in for an unreliable network path to an OCI registry (an overloaded
# registry, a flaky load balancer, a proxy that cuts connections), and
# optionally for a registry that implements the OCI 1.1 referrers API: a small
# HTTP/1.1 proxy in front of the real test registry (Debian's docker-registry,
# distribution 2.8) that injects faults on request and can emulate
# `GET /v2/<name>/referrers/<digest>`. Written from the OCI distribution-spec
# v1.1 ("Listing Referrers", "Pushing Manifests with Subject", "Deleting
# Manifests") and RFC 9110; no registry code.
#
# Every request is forwarded to --upstream unchanged except: hop-by-hop headers
# are dropped, Host is the upstream's, and a Location that points at the
# upstream is rewritten to point at the proxy. Request bodies are streamed;
# response bodies with a Content-Length are streamed, others buffered.
#
# TEST-ONLY control endpoints (not part of any registry API, no auth):
#   POST   /_proxy/faults  JSON list of rules (or one rule); REPLACES the rules.
#          A rule: {"method": "PUT", "path": "regex", "kind": "status|reset|slow|truncate",
#                   "status": 503, "retry_after": "1", "delay": 2.0, "times": N,
#                   "stage": "request|response"}
#          method: exact (case-insensitive) or omitted/"*" for any; path: re.search
#          against the request path WITHOUT its query string; times: the first N
#          matching requests get the fault, omitted/null = every matching request
#          forever. The first rule with times left that matches applies.
#            status   answer `status` (default 503) without forwarding, with
#                     Retry-After if given and a distribution-style JSON error;
#                     the request body is read and discarded first.
#            reset    stage "request" (default): read half the request body (none
#                     if it has none), then close with RST (SO_LINGER 0): the
#                     upstream never sees the request. stage "response": forward
#                     the whole request, let the upstream act on it, read its
#                     answer, then RST instead of answering (a write that
#                     happened but whose answer was lost).
#            slow     sleep `delay` seconds (default 1.0), then forward.
#            truncate forward; answer with the upstream's status, headers and
#                     full Content-Length but only the first half of the body,
#                     then close the connection.
#   GET    /_proxy/faults  the rules with the times left
#   DELETE /_proxy/faults  clear the rules
#   GET    /_proxy/log     [{method, path, status, fault}] for every non-control
#                          request in arrival order (path without query; status is
#                          what the client got, null for a reset)
#   DELETE /_proxy/log     clear the log
#
# --referrers: emulate the referrers API on top of a registry that lacks it.
#   PUT /v2/<name>/manifests/<ref> whose JSON body has a "subject": once the
#     upstream accepts it (2xx), its descriptor {mediaType, digest, size,
#     artifactType (artifactType, else config.mediaType for an image manifest),
#     annotations (if any)} is recorded under (name, subject digest) and the
#     answer carries `OCI-Subject: <subject digest>`. Pushing the same digest
#     again replaces its entry.
#   GET /v2/<name>/referrers/<digest>[?artifactType=X]: 200 with an image index
#     (application/vnd.oci.image.index.v1+json, schemaVersion 2, manifests =
#     the recorded descriptors, in push order); with artifactType, only those
#     whose artifactType equals X, and `OCI-Filters-Applied: artifactType`. A
#     malformed digest is 400 DIGEST_INVALID. Auth follows the upstream: the
#     proxy asks the upstream GET /v2/<name>/tags/list with the caller's
#     Authorization and relays a 401/403 (with its WWW-Authenticate).
#   DELETE /v2/<name>/manifests/<digest>: once the upstream accepts it, that
#     digest leaves every referrers list of <name>.
#   Without --referrers, /referrers/ is forwarded (distribution 2.8 answers 404).
# Gaps: no pagination (Link) of referrers, no HEAD on /referrers/, the
# referrers state lives in memory only (lost on restart) and does not see
# manifests pushed to the upstream directly; no TLS; HTTP/1.1 only; chunked
# request bodies are buffered, not streamed.
#
# Logs one line per request to stderr: method, path WITHOUT query string,
# status, fault. Never headers or bodies (no credentials).
# CLI: --upstream http://127.0.0.1:PORT --port 0 [--port-file F] [--referrers].
# Binds 127.0.0.1 only; writes the port to --port-file (atomically) and prints
# PORT=<n> as the first stdout line, then serves until killed.
import argparse
import hashlib
import http.client
import http.server
import json
import os
import re
import socket
import struct
import sys
import threading
import time
import urllib.parse

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
MANIFEST_RE = re.compile(r"^/v2/(?P<name>.+)/manifests/(?P<ref>[^/]+)$")
REFERRERS_RE = re.compile(r"^/v2/(?P<name>.+)/referrers/(?P<digest>[^/]+)$")
DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$|^sha512:[a-f0-9]{128}$")
CHUNK = 64 * 1024
MAX_MANIFEST = 4 * 1024 * 1024


class State:
    def __init__(self, upstream, referrers):
        u = urllib.parse.urlsplit(upstream)
        if u.scheme != "http" or not u.hostname:
            raise SystemExit("--upstream must be http://HOST:PORT")
        self.upstream_host = u.hostname
        self.upstream_port = u.port or 80
        self.upstream_base = f"http://{u.netloc}"
        self.referrers_enabled = referrers
        self.lock = threading.Lock()
        self.rules = []
        self.log = []
        # (name, subject digest) -> {manifest digest: descriptor}, insertion-ordered
        self.referrers = {}

    def set_rules(self, rules):
        if isinstance(rules, dict):
            rules = [rules]
        if not isinstance(rules, list):
            raise ValueError("expected a JSON list of rules")
        parsed = []
        for r in rules:
            if not isinstance(r, dict):
                raise ValueError("a rule is a JSON object")
            kind = r.get("kind", "status")
            if kind not in ("status", "reset", "slow", "truncate"):
                raise ValueError(f"unknown kind {kind!r}")
            stage = r.get("stage", "request")
            if stage not in ("request", "response"):
                raise ValueError(f"unknown stage {stage!r}")
            times = r.get("times")
            if times is not None and (not isinstance(times, int) or times < 0):
                raise ValueError("times must be a non-negative integer or null")
            parsed.append(
                {
                    "method": (r.get("method") or "*").upper(),
                    "path": r.get("path", ""),
                    "regex": re.compile(r.get("path", "")),
                    "kind": kind,
                    "status": int(r.get("status", 503)),
                    "retry_after": None if r.get("retry_after") is None else str(r["retry_after"]),
                    "delay": float(r.get("delay", 1.0)),
                    "times": times,
                    "stage": stage,
                }
            )
        with self.lock:
            self.rules = parsed

    def take_fault(self, method, path):
        with self.lock:
            for r in self.rules:
                if r["method"] not in ("*", method):
                    continue
                if not r["regex"].search(path):
                    continue
                if r["times"] is not None:
                    if r["times"] <= 0:
                        continue
                    r["times"] -= 1
                return dict(r)
        return None

    def rules_view(self):
        with self.lock:
            return [{k: v for k, v in r.items() if k != "regex"} for r in self.rules]

    def record(self, method, path, status, fault):
        with self.lock:
            self.log.append({"method": method, "path": path, "status": status, "fault": fault})
        print(f"registry_proxy: {method} {path} {status} {fault or '-'}", file=sys.stderr, flush=True)


class LimitedReader:
    """Reads exactly `n` bytes of a request body, for http.client to stream."""

    def __init__(self, f, n):
        self.f, self.left = f, n

    def read(self, size=-1):
        if self.left <= 0:
            return b""
        size = self.left if size is None or size < 0 else min(size, self.left)
        data = self.f.read(min(size, CHUNK))
        if not data:
            raise ConnectionError("client closed the connection mid-body")
        self.left -= len(data)
        return data


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "registry_proxy"
    state: State = None

    def log_message(self, fmt, *args):
        pass

    def send_response_only(self, code, message=None):
        self.answered = True
        super().send_response_only(code, message)

    def do_GET(self):
        self.handle_any()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    # ---- plumbing ----------------------------------------------------------

    def body_length(self):
        te = self.headers.get("Transfer-Encoding", "")
        if "chunked" in te.lower():
            return None
        return int(self.headers.get("Content-Length") or 0)

    def read_chunked(self):
        out = bytearray()
        while True:
            line = self.rfile.readline(1024)
            if not line:
                raise ConnectionError("client closed the connection mid-body")
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                return bytes(out)
            out += self.rfile.read(size)
            self.rfile.readline(8)

    def read_body(self):
        n = self.body_length()
        if n is None:
            return self.read_chunked()
        return self.rfile.read(n) if n else b""

    def send_simple(self, status, body=b"", headers=()):
        self.send_response_only(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def send_json(self, status, value, headers=()):
        body = json.dumps(value).encode()
        self.send_simple(status, body, [("Content-Type", "application/json"), *headers])

    def reset(self):
        """Closes with RST: SO_LINGER 0, then close. socket.close() waits for the
        makefile() readers, so rfile goes first (wfile is not one of them)."""
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close_connection = True
        try:
            self.rfile.close()
        except OSError:
            pass
        self.connection.close()

    def proxy_base(self):
        return f"http://{self.headers.get('Host') or '127.0.0.1:%d' % self.server.server_port}"

    def forward_headers(self, length):
        out = []
        for k, v in self.headers.items():
            lk = k.lower()
            if lk in HOP_BY_HOP or lk in ("host", "content-length"):
                continue
            out.append((k, v))
        if length is not None:
            out.append(("Content-Length", str(length)))
        return out

    def upstream(self, method, target, body, headers):
        """Sends one request upstream; `body` is bytes or a LimitedReader."""
        s = self.state
        conn = http.client.HTTPConnection(s.upstream_host, s.upstream_port, timeout=300)
        conn.putrequest(method, target, skip_accept_encoding=True)
        for k, v in headers:
            conn.putheader(k, v)
        conn.endheaders()
        if isinstance(body, (bytes, bytearray)):
            if body:
                conn.send(body)
        elif body is not None:
            while True:
                data = body.read(CHUNK)
                if not data:
                    break
                conn.send(data)
        resp = conn.getresponse()
        return conn, resp

    def response_headers(self, resp):
        out = []
        for k, v in resp.getheaders():
            lk = k.lower()
            if lk in HOP_BY_HOP or lk == "content-length":
                continue
            if lk == "location" and v.startswith(self.state.upstream_base):
                v = self.proxy_base() + v[len(self.state.upstream_base):]
            out.append((k, v))
        return out

    def relay(self, resp, extra_headers=(), body=None, truncate=False):
        """Answers with the upstream's response. Returns the status sent."""
        headers = self.response_headers(resp) + list(extra_headers)
        length = resp.getheader("Content-Length")
        no_body = self.command == "HEAD" or resp.status in (204, 304) or resp.status < 200
        if body is None and (length is None or truncate) and not no_body:
            body = resp.read()
        self.send_response_only(resp.status)
        for k, v in headers:
            self.send_header(k, v)
        if no_body:
            if length is not None:
                self.send_header("Content-Length", length)
            self.end_headers()
            resp.read()
            return resp.status
        if body is not None:
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if truncate:
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
            else:
                self.wfile.write(body)
            return resp.status
        self.send_header("Content-Length", length)
        self.end_headers()
        while True:
            data = resp.read(CHUNK)
            if not data:
                break
            self.wfile.write(data)
        return resp.status

    # ---- the request ---------------------------------------------------------

    def handle_any(self):
        split = urllib.parse.urlsplit(self.path)
        path = split.path
        if path.startswith("/_proxy/"):
            return self.control(path)
        s = self.state
        method = self.command
        self.answered = False
        fault = s.take_fault(method, path)
        kind = fault["kind"] if fault else None
        try:
            if kind == "status":
                self.read_body()
                headers = []
                if fault["retry_after"] is not None:
                    headers.append(("Retry-After", fault["retry_after"]))
                code = fault["status"]
                self.send_json(
                    code,
                    {"errors": [{"code": "UNAVAILABLE", "message": "injected by registry_proxy", "detail": None}]},
                    headers,
                )
                s.record(method, path, code, "status")
                return
            if kind == "reset" and fault["stage"] == "request":
                n = self.body_length()
                if n is None:
                    self.read_chunked()
                elif n:
                    self.rfile.read(n // 2)
                s.record(method, path, None, "reset")
                self.reset()
                return
            if kind == "slow":
                time.sleep(fault["delay"])
            if s.referrers_enabled and method == "GET" and REFERRERS_RE.match(path):
                status = self.referrers_get(REFERRERS_RE.match(path), split.query)
                s.record(method, path, status, kind)
                return
            status = self.forward(method, path, kind, fault)
            s.record(method, path, status, kind)
        except OSError as e:  # connection errors and timeouts, either side
            status = None
            if not self.answered and self.connection.fileno() != -1:
                # The upstream failed before answering: what a gateway says.
                status = 502
                try:
                    self.send_json(502, {"errors": [{"code": "UNAVAILABLE", "message": f"registry_proxy: upstream: {type(e).__name__}", "detail": None}]})
                except OSError:
                    status = None
            s.record(method, path, status, f"{kind or 'none'}; error: {type(e).__name__}")
            self.close_connection = True

    def forward(self, method, path, kind, fault):
        s = self.state
        target = self.path
        m = MANIFEST_RE.match(path)
        inspect = s.referrers_enabled and m is not None and method == "PUT"
        n = self.body_length()
        if n is None or inspect:
            body = self.read_body()
            length = len(body)
        else:
            body = LimitedReader(self.rfile, n) if n else b""
            length = n if (n or method in ("POST", "PUT", "PATCH")) else None
        conn, resp = self.upstream(method, target, body, self.forward_headers(length))
        try:
            if kind == "reset":  # stage "response": the upstream acted, the answer is lost
                resp.read()
                self.reset()
                return None
            extra = []
            if s.referrers_enabled and m is not None and 200 <= resp.status < 300:
                if method == "PUT":
                    subject = self.record_referrer(m.group("name"), body, resp)
                    if subject:
                        extra.append(("OCI-Subject", subject))
                elif method == "DELETE":
                    self.forget_referrer(m.group("name"), m.group("ref"))
            return self.relay(resp, extra, truncate=(kind == "truncate"))
        finally:
            conn.close()

    # ---- referrers -------------------------------------------------------------

    def record_referrer(self, name, body, resp):
        if len(body) > MAX_MANIFEST:
            return None
        try:
            manifest = json.loads(body)
        except ValueError:
            return None
        if not isinstance(manifest, dict):
            return None
        subject = manifest.get("subject")
        if not isinstance(subject, dict) or not isinstance(subject.get("digest"), str):
            return None
        digest = resp.getheader("Docker-Content-Digest") or "sha256:" + hashlib.sha256(body).hexdigest()
        media_type = manifest.get("mediaType") or self.headers.get("Content-Type", "")
        desc = {"mediaType": media_type, "digest": digest, "size": len(body)}
        artifact_type = manifest.get("artifactType")
        if not artifact_type and media_type != INDEX_MEDIA_TYPE and "manifests" not in manifest:
            artifact_type = (manifest.get("config") or {}).get("mediaType")
        if artifact_type:
            desc["artifactType"] = artifact_type
        if isinstance(manifest.get("annotations"), dict) and manifest["annotations"]:
            desc["annotations"] = manifest["annotations"]
        with self.state.lock:
            entries = self.state.referrers.setdefault((name, subject["digest"]), {})
            entries.pop(digest, None)
            entries[digest] = desc
        return subject["digest"]

    def forget_referrer(self, name, ref):
        if not DIGEST_RE.match(ref):
            return
        with self.state.lock:
            for (n, _), entries in self.state.referrers.items():
                if n == name:
                    entries.pop(ref, None)

    def referrers_get(self, m, query):
        name, digest = m.group("name"), m.group("digest")
        # Auth as the upstream would judge it.
        auth = [(k, v) for k, v in self.headers.items() if k.lower() == "authorization"]
        conn, resp = self.upstream("GET", f"/v2/{name}/tags/list", b"", auth)
        try:
            resp.read()
            if resp.status in (401, 403):
                headers = [(k, v) for k, v in resp.getheaders() if k.lower() == "www-authenticate"]
                self.send_json(
                    resp.status,
                    {"errors": [{"code": "UNAUTHORIZED" if resp.status == 401 else "DENIED", "message": "authentication required", "detail": None}]},
                    headers,
                )
                return resp.status
        finally:
            conn.close()
        if not DIGEST_RE.match(digest):
            self.send_json(400, {"errors": [{"code": "DIGEST_INVALID", "message": "provided digest did not match uploaded content", "detail": None}]})
            return 400
        wanted = urllib.parse.parse_qs(query).get("artifactType")
        with self.state.lock:
            manifests = list(self.state.referrers.get((name, digest), {}).values())
        headers = [("Content-Type", INDEX_MEDIA_TYPE)]
        if wanted:
            manifests = [d for d in manifests if d.get("artifactType") == wanted[0]]
            headers.append(("OCI-Filters-Applied", "artifactType"))
        index = {"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": manifests}
        self.send_simple(200, json.dumps(index).encode(), headers)
        return 200

    # ---- control -----------------------------------------------------------------

    def control(self, path):
        s = self.state
        try:
            body = self.read_body()
            if path == "/_proxy/faults" and self.command == "POST":
                s.set_rules(json.loads(body or b"[]"))
                return self.send_json(200, s.rules_view())
            if path == "/_proxy/faults" and self.command == "GET":
                return self.send_json(200, s.rules_view())
            if path == "/_proxy/faults" and self.command == "DELETE":
                s.set_rules([])
                return self.send_simple(204)
            if path == "/_proxy/log" and self.command == "GET":
                with s.lock:
                    log = list(s.log)
                return self.send_json(200, log)
            if path == "/_proxy/log" and self.command == "DELETE":
                with s.lock:
                    s.log.clear()
                return self.send_simple(204)
            return self.send_json(404, {"error": "unknown control endpoint"})
        except (ValueError, re.error) as e:
            return self.send_json(400, {"error": str(e)})


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file")
    ap.add_argument("--referrers", action="store_true")
    args = ap.parse_args()
    Handler.state = State(args.upstream, args.referrers)
    server = Server(("127.0.0.1", args.port), Handler)
    port = server.server_address[1]
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{port}\n")
        os.replace(tmp, args.port_file)
    print(f"PORT={port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
# Stands in for the GitHub REST API, version 2022-11-28 (api.github.com, or a
# GitHub Enterprise Server under --prefix /api/v3), for the GitHub Actions
# secrets and variables endpoints keybroker calls, and nothing else. Written
# from GitHub's OpenAPI description (github/rest-api-description,
# descriptions/api.github.com/api.github.com.2022-11-28.yaml) and the REST docs
# (docs.github.com/rest/actions/secrets, /rest/actions/variables); no GitHub code.
#
# Scopes: repositories (--repo OWNER/NAME), organizations (--org ORG) and
# deployment environments (--environment OWNER/NAME:ENV). Each scope holds a
# real X25519 key pair (key_id a numeric string, like GitHub's). Every secret
# PUT is DECRYPTED with nacl.public.SealedBox and the plaintext stored, so a
# test proves the client's libsodium sealed box is right: a value that does not
# open, or a key_id that is not the scope's current one, is answered 422.
#
# Endpoints (all under --prefix, default ""):
#   GET    /repos/{o}/{r}/actions/secrets/public-key            200 {key_id, key}
#   GET    /repos/{o}/{r}/actions/secrets                        200 {total_count, secrets}
#   GET    /repos/{o}/{r}/actions/secrets/{name}                 200 {name, created_at, updated_at}
#   PUT    /repos/{o}/{r}/actions/secrets/{name}                 201 {} created / 204 updated
#   DELETE /repos/{o}/{r}/actions/secrets/{name}                 204
#   POST   /repos/{o}/{r}/actions/variables  {name, value}       201 {} / 409 exists
#   GET    /repos/{o}/{r}/actions/variables                      200 {total_count, variables}
#   GET    /repos/{o}/{r}/actions/variables/{name}               200 {name, value, created_at, updated_at}
#   PATCH  /repos/{o}/{r}/actions/variables/{name} {name?, value?} 204
#   DELETE /repos/{o}/{r}/actions/variables/{name}               204
#   the same under /orgs/{org}/actions/... (secrets and variables take
#   visibility all|private|selected and selected_repository_ids; visibility is
#   required on PUT secret and POST variable) and under
#   /repos/{o}/{r}/environments/{env}/secrets|variables/...
# Auth: "Authorization: Bearer T" or "Authorization: token T". No header ->
# 401 "Requires authentication"; an unknown token -> 401 "Bad credentials"; a
# --readonly-token may GET but any write -> 403 "Resource not accessible by
# personal access token" (like a fine-grained PAT with read-only Secrets and
# Variables permissions). A request without User-Agent -> 403 (GitHub requires
# one). Unknown repo/org/environment/secret/variable -> 404 "Not Found".
# Errors carry GitHub's basic-error shape {message, documentation_url, status}.
#
# TEST-ONLY control endpoints, NOT part of GitHub's API (no auth needed):
#   GET  /_fake/secrets/{repos/O/R | orgs/ORG | repos/O/R/environments/ENV}
#        -> {"secrets": {NAME: plaintext}, "visibility": {...}, "key_id": ...}
#   POST /_fake/rotate-key/{same scope}   -> new key pair; old key_id now 422
#   GET  /_fake/requests -> [{method, path, status, user_agent, api_version,
#                              auth}]  (auth is only the scheme, never a token)
#
# Gaps (differences from GitHub): only the endpoints above; no rate limiting,
# no ETag/conditional requests, no scopes beyond read-only vs full; selected-
# repository sub-resources are not served; an environment has its own key pair
# (GitHub may share the repository's), so a client must ask the environment
# endpoint for its key; the 422 wording for undecryptable values, bad names and
# stale key_ids is the fake's own; X-GitHub-Api-Version is recorded but not
# validated; every repository is private (no anonymous access).
#
# Logs one line per request to stderr: method, path WITHOUT query string, status.
# Never bodies, never headers, never tokens or secret values.
# Binds 127.0.0.1 only; prints PORT=<n> as the first stdout line, then serves
# until killed.
import argparse
import base64
import json
import re
import secrets as _random
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, SealedBox

DOCS = "https://docs.github.com/rest"
DOCS_SECRETS = "https://docs.github.com/rest/actions/secrets"
DOCS_VARIABLES = "https://docs.github.com/rest/actions/variables"
MAX_VALUE_BYTES = 48 * 1024  # GitHub: secrets and variables up to 48 KB
NAME_RE = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*\Z")
BASE64_RE = re.compile(r"\A(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=|[A-Za-z0-9+/]{4})\Z")
VISIBILITIES = ("all", "private", "selected")
UA_MESSAGE = ("Request forbidden by administrative rules. Please make sure your request has a "
              "User-Agent header (https://docs.github.com/en/rest/overview/resources-in-the-rest-api"
              "#user-agent-required). Check https://developer.github.com for other possible causes.")


def now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def new_key_id():
    return str(_random.randbelow(9 * 10**17) + 10**17)  # 18 digits, like GitHub's


class Scope:
    """One place that holds secrets and variables: a repo, an org or an environment."""

    def __init__(self, kind, name):
        self.kind = kind  # "repo" | "org" | "env"
        self.name = name
        self.secrets = {}  # UPPER NAME -> {value: bytes, created_at, updated_at, visibility?, selected?}
        self.variables = {}  # UPPER NAME -> {name, value, created_at, updated_at, visibility?, selected?}
        self.rotate()

    def rotate(self):
        self.private_key = PrivateKey.generate()
        self.key_id = new_key_id()

    def public_key(self):
        return base64.b64encode(bytes(self.private_key.public_key)).decode()


class State:
    def __init__(self, tokens, readonly, repos, orgs, envs):
        self.lock = threading.Lock()
        self.tokens = set(tokens)
        self.readonly = set(readonly)
        self.repos = {r.lower(): Scope("repo", r) for r in repos}
        self.orgs = {o.lower(): Scope("org", o) for o in orgs}
        self.envs = {}
        for spec in envs:
            repo, _, env = spec.partition(":")
            if not env or "/" not in repo:
                raise SystemExit(f"--environment wants OWNER/NAME:ENV, got {spec!r}")
            self.repos.setdefault(repo.lower(), Scope("repo", repo))
            self.envs[(repo.lower(), env.lower())] = Scope("env", f"{repo}:{env}")
        self.requests = []


class ApiError(Exception):
    def __init__(self, status, message, doc=DOCS, extra=None):
        super().__init__(message)
        self.status = status
        self.body = {"message": message, "documentation_url": doc, "status": str(status)}
        if extra:
            self.body.update(extra)


def not_found(doc=DOCS):
    return ApiError(404, "Not Found", doc)


def invalid(message, doc):
    return ApiError(422, message, doc)


def check_name(raw, kind, doc):
    """GitHub's rules for secret and variable names: [A-Za-z0-9_], not starting
    with a digit, not starting with GITHUB_; case-insensitive (stored upper)."""
    if not isinstance(raw, str) or not NAME_RE.match(raw) or raw.upper().startswith("GITHUB_"):
        raise invalid(f"Invalid request.\n\n{kind} name {raw!r} is invalid: names may contain only "
                      "alphanumeric characters or underscores, must not start with a number and must "
                      "not start with GITHUB_.", doc)
    return raw.upper()


def required(body, field, doc):
    if field not in body or body[field] is None:
        raise invalid(f'Invalid request.\n\n"{field}" wasn\'t supplied.', doc)
    return body[field]


def string_field(body, field, doc, require=True):
    if require:
        required(body, field, doc)
    elif field not in body:
        return None
    value = body[field]
    if not isinstance(value, str):
        raise invalid(f"Invalid request.\n\nInvalid property /{field}: `{type(value).__name__}` is not of type `string`.", doc)
    return value


def visibility_fields(body, doc, require):
    vis = string_field(body, "visibility", doc, require)
    if vis is not None and vis not in VISIBILITIES:
        raise invalid(f"Invalid request.\n\nInvalid property /visibility: `{vis}` is not a possible value. "
                      "Must be one of the following: all, private, selected.", doc)
    ids = body.get("selected_repository_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise invalid("Invalid request.\n\nInvalid property /selected_repository_ids: must be an array of integers.", doc)
        if vis is not None and vis != "selected":
            raise invalid("Invalid request.\n\nselected_repository_ids may only be given when visibility is selected.", doc)
    return vis, ids


def paginate(items, query, default, maximum):
    try:
        per_page = max(1, min(maximum, int(query.get("per_page", [default])[0])))
        page = max(1, int(query.get("page", ["1"])[0]))
    except ValueError:
        per_page, page = default, 1
    start = (page - 1) * per_page
    return items[start:start + per_page]


def make_handler(state, prefix):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "github-fake"
        sys_version = ""

        # ---- logging: request line without query string, never bodies ----
        def log_request(self, code="-", size="-"):
            path = urllib.parse.urlsplit(self.path).path
            sys.stderr.write(f"github-fake: {self.command} {path} {code}\n")
            sys.stderr.flush()

        def log_message(self, fmt, *args):  # errors from the base class
            sys.stderr.write("github-fake: %s\n" % (fmt % args))

        # ---- responses ----
        def respond(self, status, body=None, content_type="application/json; charset=utf-8", headers=None):
            self.status_sent = status
            data = b""
            if body is not None and status != 204:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("X-GitHub-Api-Version-Selected", "2022-11-28")
            self.send_header("X-GitHub-Media-Type", "github.v3; format=json")
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if status != 204:
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if data:
                self.wfile.write(data)

        def read_body(self):
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    line = self.rfile.readline().strip()
                    size = int(line.split(b";")[0], 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        break
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                return b"".join(chunks)
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def json_body(self, raw, doc):
            if not raw:
                return {}
            try:
                body = json.loads(raw)
            except ValueError:
                raise ApiError(400, "Problems parsing JSON", doc)
            if not isinstance(body, dict):
                raise ApiError(400, "Problems parsing JSON", doc)
            return body

        # ---- dispatch ----
        def do_GET(self):
            self.handle_any()

        def do_PUT(self):
            self.handle_any()

        def do_POST(self):
            self.handle_any()

        def do_PATCH(self):
            self.handle_any()

        def do_DELETE(self):
            self.handle_any()

        def handle_any(self):
            self.status_sent = None
            raw = self.read_body()
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query)
            auth = self.headers.get("Authorization", "")
            scheme = auth.split(" ", 1)[0] if auth else "none"
            try:
                if url.path.startswith("/_fake/"):
                    self.control(url.path, raw)
                else:
                    self.api(url.path, query, raw, auth)
            except ApiError as e:
                self.respond(e.status, e.body)
            except Exception as e:  # never echo request data
                sys.stderr.write(f"github-fake: internal error {type(e).__name__}\n")
                self.respond(500, {"message": "Server Error", "documentation_url": DOCS, "status": "500"})
            finally:
                if not url.path.startswith("/_fake/"):
                    with state.lock:
                        state.requests.append({
                            "method": self.command,
                            "path": url.path,
                            "status": self.status_sent,
                            "user_agent": self.headers.get("User-Agent"),
                            "api_version": self.headers.get("X-GitHub-Api-Version"),
                            "accept": self.headers.get("Accept"),
                            "auth": scheme,
                        })

        # ---- test-only control plane ----
        def control(self, path, raw):
            parts = [urllib.parse.unquote(p) for p in path.split("/")[2:] if p]
            if parts == ["requests"] and self.command == "GET":
                with state.lock:
                    return self.respond(200, list(state.requests))
            if len(parts) >= 2 and parts[0] in ("secrets", "rotate-key"):
                scope = self.scope_from_parts(parts[1:])
                if scope is None:
                    raise ApiError(404, "no such fake scope")
                with state.lock:
                    if parts[0] == "secrets" and self.command == "GET":
                        out = {}
                        for name, s in scope.secrets.items():
                            try:
                                out[name] = s["value"].decode("utf-8")
                            except UnicodeDecodeError:
                                out[name] = "base64:" + base64.b64encode(s["value"]).decode()
                        return self.respond(200, {
                            "secrets": out,
                            "visibility": {n: s.get("visibility") for n, s in scope.secrets.items() if "visibility" in s},
                            "variables": {n: v["value"] for n, v in scope.variables.items()},
                            "key_id": scope.key_id,
                        })
                    if parts[0] == "rotate-key" and self.command == "POST":
                        scope.rotate()
                        return self.respond(200, {"key_id": scope.key_id, "key": scope.public_key()})
            raise ApiError(404, "no such fake control endpoint")

        def scope_from_parts(self, parts):
            if len(parts) == 3 and parts[0] == "repos":
                return state.repos.get(f"{parts[1]}/{parts[2]}".lower())
            if len(parts) == 2 and parts[0] == "orgs":
                return state.orgs.get(parts[1].lower())
            if len(parts) == 5 and parts[0] == "repos" and parts[3] == "environments":
                return state.envs.get((f"{parts[1]}/{parts[2]}".lower(), parts[4].lower()))
            return None

        # ---- the API ----
        def api(self, path, query, raw, auth):
            if prefix:
                if not (path == prefix or path.startswith(prefix + "/")):
                    raise not_found()
                path = path[len(prefix):]
            if not self.headers.get("User-Agent"):
                self.status_sent = 403
                return self.respond(403, UA_MESSAGE.encode(), content_type="text/plain; charset=utf-8")
            token = None
            if auth.startswith("Bearer "):
                token = auth[7:].strip()
            elif auth.lower().startswith("token "):
                token = auth[6:].strip()
            if not auth:
                raise ApiError(401, "Requires authentication", DOCS)
            if token not in state.tokens and token not in state.readonly:
                raise ApiError(401, "Bad credentials", DOCS)
            readonly = token in state.readonly and token not in state.tokens

            parts = [urllib.parse.unquote(p) for p in path.split("/")[1:]]
            if parts and parts[-1] == "":
                parts = parts[:-1]
            scope, rest = self.route_scope(parts)
            if scope is None or not rest or rest[0] not in ("secrets", "variables"):
                raise not_found()
            kind, rest = rest[0], rest[1:]
            doc = DOCS_SECRETS if kind == "secrets" else DOCS_VARIABLES
            if self.command != "GET" and readonly:
                raise ApiError(403, "Resource not accessible by personal access token", doc)
            with state.lock:
                if kind == "secrets":
                    return self.secrets(scope, rest, query, raw, doc)
                return self.variables(scope, rest, query, raw, doc)

        def route_scope(self, parts):
            """(scope, remaining parts) or (None, None); 404 for unknown owners."""
            if len(parts) >= 4 and parts[0] == "repos":
                repo = state.repos.get(f"{parts[1]}/{parts[2]}".lower())
                if repo is None:
                    raise not_found()
                if parts[3] == "actions":
                    return repo, parts[4:]
                if parts[3] == "environments" and len(parts) >= 5:
                    env = state.envs.get((f"{parts[1]}/{parts[2]}".lower(), parts[4].lower()))
                    if env is None:
                        raise not_found()
                    return env, parts[5:]
                return None, None
            if len(parts) >= 3 and parts[0] == "orgs":
                org = state.orgs.get(parts[1].lower())
                if org is None:
                    raise not_found()
                if parts[2] == "actions":
                    return org, parts[3:]
            return None, None

        def secrets(self, scope, rest, query, raw, doc):
            m = self.command
            if rest == ["public-key"] and m == "GET":
                return self.respond(200, {"key_id": scope.key_id, "key": scope.public_key()})
            if not rest and m == "GET":
                names = sorted(scope.secrets)
                page = paginate(names, query, 30, 100)
                return self.respond(200, {"total_count": len(names),
                                          "secrets": [self.secret_view(scope, n) for n in page]})
            if len(rest) != 1 or rest[0] == "public-key":
                raise not_found(doc)
            name = rest[0].upper()
            if m == "GET":
                if name not in scope.secrets:
                    raise not_found(doc)
                return self.respond(200, self.secret_view(scope, name))
            if m == "DELETE":
                if scope.secrets.pop(name, None) is None:
                    raise not_found(doc)
                return self.respond(204)
            if m != "PUT":
                raise not_found(doc)
            name = check_name(rest[0], "Secret", doc)
            body = self.json_body(raw, doc)
            encrypted = string_field(body, "encrypted_value", doc)
            key_id = string_field(body, "key_id", doc)
            vis = ids = None
            if scope.kind == "org":
                vis, ids = visibility_fields(body, doc, require=True)
            if not BASE64_RE.match(encrypted):
                raise invalid("Invalid request.\n\nInvalid property /encrypted_value: does not match "
                              "/^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=|[A-Za-z0-9+/]{4})$/.", doc)
            if key_id != scope.key_id:
                raise invalid(f"key_id {key_id!r} is not the current public key of this {scope.kind}; "
                              "fetch the public key again.", doc)
            try:
                plaintext = SealedBox(scope.private_key).decrypt(base64.b64decode(encrypted))
            except (CryptoError, ValueError):
                raise invalid("encrypted_value could not be decrypted: it must be a libsodium sealed box "
                              "(crypto_box_seal) for the public key named by key_id, base64-encoded.", doc)
            if len(plaintext) > MAX_VALUE_BYTES:
                raise invalid("Secret value is too large: secrets are limited to 48 KB.", doc)
            ts = now()
            existing = scope.secrets.get(name)
            entry = {"value": plaintext, "created_at": existing["created_at"] if existing else ts, "updated_at": ts}
            if scope.kind == "org":
                entry["visibility"] = vis
                entry["selected"] = ids or []
            scope.secrets[name] = entry
            if existing:
                return self.respond(204)
            return self.respond(201, {})

        def secret_view(self, scope, name):
            s = scope.secrets[name]
            view = {"name": name, "created_at": s["created_at"], "updated_at": s["updated_at"]}
            if scope.kind == "org":
                view["visibility"] = s["visibility"]
                if s["visibility"] == "selected":
                    view["selected_repositories_url"] = (
                        f"https://api.github.com/orgs/{scope.name}/actions/secrets/{name}/repositories")
            return view

        def variables(self, scope, rest, query, raw, doc):
            m = self.command
            if not rest:
                if m == "GET":
                    names = sorted(scope.variables)
                    page = paginate(names, query, 10, 30)
                    return self.respond(200, {"total_count": len(names),
                                              "variables": [self.variable_view(scope, n) for n in page]})
                if m != "POST":
                    raise not_found(doc)
                body = self.json_body(raw, doc)
                raw_name = string_field(body, "name", doc)
                value = string_field(body, "value", doc)
                vis = ids = None
                if scope.kind == "org":
                    vis, ids = visibility_fields(body, doc, require=True)
                name = check_name(raw_name, "Variable", doc)
                if len(value.encode()) > MAX_VALUE_BYTES:
                    raise invalid("Variable value is too large: variables are limited to 48 KB.", doc)
                if name in scope.variables:
                    raise ApiError(409, "Already exists - Variable already exists", doc)
                ts = now()
                entry = {"name": name, "value": value, "created_at": ts, "updated_at": ts}
                if scope.kind == "org":
                    entry["visibility"] = vis
                    entry["selected"] = ids or []
                scope.variables[name] = entry
                return self.respond(201, {})
            if len(rest) != 1:
                raise not_found(doc)
            name = rest[0].upper()
            if name not in scope.variables:
                raise not_found(doc)
            if m == "GET":
                return self.respond(200, self.variable_view(scope, name))
            if m == "DELETE":
                del scope.variables[name]
                return self.respond(204)
            if m != "PATCH":
                raise not_found(doc)
            body = self.json_body(raw, doc)
            value = string_field(body, "value", doc, require=False)
            new_raw = string_field(body, "name", doc, require=False)
            vis = ids = None
            if scope.kind == "org":
                vis, ids = visibility_fields(body, doc, require=False)
            entry = scope.variables[name]
            if value is not None:
                if len(value.encode()) > MAX_VALUE_BYTES:
                    raise invalid("Variable value is too large: variables are limited to 48 KB.", doc)
                entry["value"] = value
            if vis is not None:
                entry["visibility"] = vis
            if ids is not None:
                entry["selected"] = ids
            if new_raw is not None:
                new = check_name(new_raw, "Variable", doc)
                if new != name:
                    if new in scope.variables:
                        raise ApiError(409, "Already exists - Variable already exists", doc)
                    entry["name"] = new
                    scope.variables[new] = scope.variables.pop(name)
            entry["updated_at"] = now()
            return self.respond(204)

        def variable_view(self, scope, name):
            v = scope.variables[name]
            view = {"name": v["name"], "value": v["value"], "created_at": v["created_at"], "updated_at": v["updated_at"]}
            if scope.kind == "org":
                view["visibility"] = v["visibility"]
                if v["visibility"] == "selected":
                    view["selected_repositories_url"] = (
                        f"https://api.github.com/orgs/{scope.name}/actions/variables/{v['name']}/repositories")
            return view

    return Handler


def main():
    ap = argparse.ArgumentParser(description="Fake GitHub REST API (Actions secrets and variables) for tests")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--token", action="append", default=[], help="a token with full access (repeatable)")
    ap.add_argument("--readonly-token", action="append", default=[], help="a token that may only GET (repeatable)")
    ap.add_argument("--repo", action="append", default=[], help="OWNER/NAME (repeatable)")
    ap.add_argument("--org", action="append", default=[], help="ORG (repeatable)")
    ap.add_argument("--environment", action="append", default=[], help="OWNER/NAME:ENV (repeatable)")
    ap.add_argument("--prefix", default="", help='API path prefix, e.g. "/api/v3" for GitHub Enterprise Server')
    args = ap.parse_args()
    for r in args.repo:
        if r.count("/") != 1:
            raise SystemExit(f"--repo wants OWNER/NAME, got {r!r}")
    prefix = args.prefix.rstrip("/")
    if prefix and not prefix.startswith("/"):
        prefix = "/" + prefix
    state = State(args.token, args.readonly_token, args.repo, args.org, args.environment)
    srv = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(state, prefix))
    srv.daemon_threads = True
    print(f"PORT={srv.server_address[1]}", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

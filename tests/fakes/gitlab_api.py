#!/usr/bin/env python3
# Stands in for the GitLab REST API v4 (gitlab.com or a self-managed GitLab),
# for the CI/CD variable endpoints keybroker calls, and nothing else. Written
# from GitLab's documentation (doc/api/project_level_variables.md,
# doc/api/group_level_variables.md, docs.gitlab.com/ci/variables/ "Mask a CI/CD
# variable", doc/api/rest "namespaced paths"); no GitLab code.
#
# Endpoints ({id} is a numeric id or a URL-encoded full path, group%2Fproject):
#   GET    /api/v4/projects/{id}                 200 {id, name, path, path_with_namespace, namespace{id,...}}
#   GET    /api/v4/groups/{id}                   200 {id, name, path, full_path, parent_id, ...}
#   GET    /api/v4/projects/{id}/variables       200 [variable, ...]   (page, per_page, X-Total headers)
#   POST   /api/v4/projects/{id}/variables       201 variable
#   GET    /api/v4/projects/{id}/variables/{key} 200 variable
#   PUT    /api/v4/projects/{id}/variables/{key} 200 variable
#   DELETE /api/v4/projects/{id}/variables/{key} 204
#   the same for /api/v4/groups/{id}/variables[/{key}]
# A variable is {variable_type, key, value, protected, masked, hidden, raw,
# environment_scope, description}; a hidden variable (created with
# masked_and_hidden=true) is returned with "value": null. Bodies may be JSON,
# application/x-www-form-urlencoded, multipart/form-data or query parameters.
# ?filter[environment_scope]=S selects among variables sharing a key.
#
# Validation as GitLab documents it:
#   key: 1-255 chars of [A-Za-z0-9_]       -> 400 {"message":{"key":[...]}}
#   duplicate key+environment_scope        -> 400 {"message":{"key":["(KEY) has already been taken"]}}
#   masked (or masked_and_hidden), raw=false: value must match
#     \A[a-zA-Z0-9_+=/@:.~-]{8,}\z (>= 8 chars, one line, Base64 alphabet plus @ : . ~)
#   masked, raw=true: value must match \A\S{8,}\z (>= 8 chars, no whitespace)
#                                          -> 400 {"message":{"value":["is invalid"]}}
#   missing key/value on create            -> 400 {"error":"key is missing"}
#   bad variable_type / boolean            -> 400 {"error":"variable_type does not have a valid value"}
# Auth: "PRIVATE-TOKEN: T" or "Authorization: Bearer T". Unknown token -> 401
# {"message":"401 Unauthorized"}; no token on a variables endpoint -> 401; no
# token on GET project/group -> 404 (every project is private). A
# --readonly-token stands for a Developer: it may GET projects and groups, but
# every variables endpoint answers 403 {"message":"403 Forbidden"} (variables
# need the Maintainer role). Unknown project/group/variable -> 404
# {"message":"404 Project Not Found"} / "404 Group Not Found" /
# "404 Variable Not Found"; unknown route -> 404 {"error":"404 Not Found"}.
#
# TEST-ONLY control endpoints, NOT part of GitLab's API (no auth needed):
#   GET /_fake/variables/projects/{id} and /_fake/variables/groups/{id}
#       -> every variable, hidden values included
#   GET /_fake/requests -> [{method, path, status, auth}] (auth is the header
#       kind only, never a token)
#
# Gaps: only the endpoints above; no instance-level variables, no rate limits,
# no roles beyond full vs Developer, no read_api-scope tokens (GitLab answers
# those with 403 "insufficient_scope" on writes); environment_scope is accepted
# on groups without a tier check; the masked value must not equal an existing
# variable name in GitLab, which is not checked; hidden variables cannot be
# un-hidden (the flag is kept on update, masked stays true).
#
# Logs one line per request to stderr: method, path WITHOUT query string, status.
# Never bodies, headers, tokens or variable values.
# CLI: --project GROUP/PROJECT:ID (repeatable), --group GROUP:ID (repeatable;
# a project's namespace is registered as a group automatically if not given),
# --token T, --readonly-token R, --port 0. Binds 127.0.0.1 only; prints
# PORT=<n> as the first stdout line, then serves until killed.
import argparse
import email.parser
import email.policy
import json
import re
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KEY_RE = re.compile(r"\A[a-zA-Z0-9_]+\Z")
MASK_RE = re.compile(r"\A[a-zA-Z0-9_+=/@:.~-]{8,}\Z")
MASK_RAW_RE = re.compile(r"\A\S{8,}\Z")
TRUE = {"true", "1", "t", "yes", "y", "on"}
FALSE = {"false", "0", "f", "no", "n", "off"}
BOOL_FIELDS = ("protected", "masked", "masked_and_hidden", "raw")


class ApiError(Exception):
    def __init__(self, status, body):
        super().__init__(str(body))
        self.status = status
        self.body = body


def msg(status, text):
    return ApiError(status, {"message": text})


class Container:
    """A project or a group: something that holds CI/CD variables."""

    def __init__(self, kind, cid, full_path):
        self.kind = kind  # "project" | "group"
        self.id = cid
        self.full_path = full_path
        self.variables = []  # list of dicts, in creation order


class State:
    def __init__(self, tokens, readonly, projects, groups):
        self.lock = threading.Lock()
        self.tokens = set(tokens)
        self.readonly = set(readonly)
        self.projects = {}
        self.groups = {}
        used = set()
        for spec in groups:
            path, cid = split_spec(spec, "--group GROUP:ID")
            self.groups[cid] = Container("group", cid, path)
            used.add(cid)
        for spec in projects:
            path, cid = split_spec(spec, "--project GROUP/PROJECT:ID")
            if "/" not in path:
                raise SystemExit(f"--project wants GROUP/PROJECT:ID, got {spec!r}")
            self.projects[cid] = Container("project", cid, path)
            used.add(cid)
        next_id = max(used | {1000}) + 1
        for p in list(self.projects.values()):
            ns = p.full_path.rsplit("/", 1)[0]
            if self.group_by_path(ns) is None:
                self.groups[next_id] = Container("group", next_id, ns)
                next_id += 1
        self.requests = []

    def group_by_path(self, path):
        for g in self.groups.values():
            if g.full_path.lower() == path.lower():
                return g
        return None

    def lookup(self, kind, ident):
        table = self.projects if kind == "project" else self.groups
        if ident.isdigit():
            return table.get(int(ident))
        for c in table.values():
            if c.full_path.lower() == ident.lower():
                return c
        return None


def split_spec(spec, usage):
    path, _, cid = spec.rpartition(":")
    if not path or not cid.isdigit():
        raise SystemExit(f"{usage}, got {spec!r}")
    return path.strip("/"), int(cid)


def web_url(path):
    return f"https://gitlab.example.com/{path}"


def project_view(state, p):
    ns_path = p.full_path.rsplit("/", 1)[0]
    g = state.group_by_path(ns_path)
    name = p.full_path.rsplit("/", 1)[1]
    return {
        "id": p.id,
        "description": None,
        "name": name,
        "name_with_namespace": " / ".join(p.full_path.split("/")),
        "path": name,
        "path_with_namespace": p.full_path,
        "default_branch": "main",
        "visibility": "private",
        "web_url": web_url(p.full_path),
        "namespace": {
            "id": g.id,
            "name": ns_path.rsplit("/", 1)[-1],
            "path": ns_path.rsplit("/", 1)[-1],
            "kind": "group",
            "full_path": ns_path,
            "parent_id": parent_id(state, ns_path),
            "avatar_url": None,
            "web_url": web_url("groups/" + ns_path),
        },
    }


def parent_id(state, path):
    if "/" not in path:
        return None
    parent = state.group_by_path(path.rsplit("/", 1)[0])
    return parent.id if parent else None


def group_view(state, g):
    name = g.full_path.rsplit("/", 1)[-1]
    return {
        "id": g.id,
        "name": name,
        "path": name,
        "description": "",
        "visibility": "private",
        "full_name": " / ".join(g.full_path.split("/")),
        "full_path": g.full_path,
        "parent_id": parent_id(state, g.full_path),
        "web_url": web_url("groups/" + g.full_path),
    }


def variable_view(v):
    return {
        "variable_type": v["variable_type"],
        "key": v["key"],
        "value": None if v["hidden"] else v["value"],
        "protected": v["protected"],
        "masked": v["masked"],
        "hidden": v["hidden"],
        "raw": v["raw"],
        "environment_scope": v["environment_scope"],
        "description": v["description"],
    }


def coerce_bool(params, field):
    if field not in params:
        return None
    value = params[field]
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in TRUE:
        return True
    if isinstance(value, str) and value.lower() in FALSE:
        return False
    raise ApiError(400, {"error": f"{field} is invalid"})


def string_param(params, field):
    if field not in params or params[field] is None:
        return None
    value = params[field]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # Grape coerces numbers to String
    if not isinstance(value, str):
        raise ApiError(400, {"error": f"{field} is invalid"})
    return value


def validate(v, others, replacing=None):
    """GitLab's model validations; errors as {"message": {field: [...]}}.
    `replacing` is the stored variable an update is about to overwrite."""
    errors = {}
    key = v["key"]
    if not key:
        errors.setdefault("key", []).append("can't be blank")
    elif len(key) > 255:
        errors.setdefault("key", []).append("is too long (maximum is 255 characters)")
    elif not KEY_RE.match(key):
        errors.setdefault("key", []).append("can contain only letters, digits and '_'.")
    if v["description"] is not None and len(v["description"]) > 255:
        errors.setdefault("description", []).append("is too long (maximum is 255 characters)")
    if v["masked"]:
        pattern = MASK_RAW_RE if v["raw"] else MASK_RE
        if not pattern.match(v["value"]):
            errors.setdefault("value", []).append("is invalid")
    for o in others:
        if o is not replacing and o["key"] == key and o["environment_scope"] == v["environment_scope"]:
            errors.setdefault("key", []).append(f"({key}) has already been taken")
            break
    if errors:
        raise ApiError(400, {"message": errors})


def make_handler(state):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "gitlab-fake"
        sys_version = ""

        def log_request(self, code="-", size="-"):
            path = urllib.parse.urlsplit(self.path).path
            sys.stderr.write(f"gitlab-fake: {self.command} {path} {code}\n")
            sys.stderr.flush()

        def log_message(self, fmt, *args):
            sys.stderr.write("gitlab-fake: %s\n" % (fmt % args))

        def respond(self, status, body=None, headers=None):
            self.status_sent = status
            data = b"" if status == 204 or body is None else json.dumps(body).encode()
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if status != 204:
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if data:
                self.wfile.write(data)

        def read_body(self):
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().strip().split(b";")[0], 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        break
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                return b"".join(chunks)
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def params(self, query, raw):
            """Query parameters merged with the body (JSON, urlencoded or multipart)."""
            params = {k: v[-1] for k, v in query.items()}
            ctype = self.headers.get("Content-Type", "")
            if not raw:
                return params
            if "json" in ctype or (not ctype and raw[:1] in (b"{", b"[")):
                try:
                    body = json.loads(raw)
                except ValueError:
                    raise ApiError(400, {"error": "The provided content-type 'application/json' is not supported."})
                if not isinstance(body, dict):
                    raise ApiError(400, {"error": "body must be a JSON object"})
                params.update(body)
            elif ctype.startswith("multipart/form-data"):
                msg_ = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                    b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + raw)
                for part in msg_.iter_parts():
                    name = part.get_param("name", header="content-disposition")
                    if name:
                        params[name] = part.get_payload(decode=True).decode("utf-8")
            else:
                params.update({k: v[-1] for k, v in urllib.parse.parse_qs(raw.decode("utf-8"), keep_blank_values=True).items()})
            return params

        def do_GET(self):
            self.handle_any()

        def do_POST(self):
            self.handle_any()

        def do_PUT(self):
            self.handle_any()

        def do_DELETE(self):
            self.handle_any()

        def handle_any(self):
            self.status_sent = None
            raw = self.read_body()
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
            auth_kind = ("private-token" if self.headers.get("PRIVATE-TOKEN") is not None
                         else (self.headers.get("Authorization", "").split(" ", 1)[0] or "none"))
            try:
                if url.path.startswith("/_fake/"):
                    self.control(url.path)
                else:
                    self.api(url.path, query, raw)
            except ApiError as e:
                self.respond(e.status, e.body)
            except Exception as e:  # never echo request data
                sys.stderr.write(f"gitlab-fake: internal error {type(e).__name__}\n")
                self.respond(500, {"message": "500 Internal Server Error"})
            finally:
                if not url.path.startswith("/_fake/"):
                    with state.lock:
                        state.requests.append({"method": self.command, "path": url.path,
                                               "status": self.status_sent, "auth": auth_kind})

        def control(self, path):
            parts = [urllib.parse.unquote(p) for p in path.split("/")[2:] if p]
            with state.lock:
                if parts == ["requests"] and self.command == "GET":
                    return self.respond(200, list(state.requests))
                if len(parts) == 3 and parts[0] == "variables" and parts[1] in ("projects", "groups"):
                    c = state.lookup(parts[1][:-1], parts[2])
                    if c is not None and self.command == "GET":
                        return self.respond(200, [dict(v) for v in c.variables])
            raise ApiError(404, {"error": "no such fake control endpoint"})

        def token(self):
            t = self.headers.get("PRIVATE-TOKEN")
            if t is None:
                auth = self.headers.get("Authorization", "")
                if auth.startswith("Bearer "):
                    t = auth[7:].strip()
            return t

        def api(self, path, query, raw):
            # Split before unquoting so group%2Fproject stays one segment.
            segs = [urllib.parse.unquote(s) for s in path.split("/")]
            if segs[:3] != ["", "api", "v4"] or len(segs) < 5 or segs[3] not in ("projects", "groups"):
                raise ApiError(404, {"error": "404 Not Found"})
            kind = segs[3][:-1]
            ident, rest = segs[4], segs[5:]
            if rest and rest[-1] == "":
                rest = rest[:-1]
            token = self.token()
            known = token in state.tokens or token in state.readonly
            if token is not None and not known:
                raise msg(401, "401 Unauthorized")
            not_found_text = "404 Project Not Found" if kind == "project" else "404 Group Not Found"
            with state.lock:
                c = state.lookup(kind, ident)
                if not rest:
                    if self.command != "GET":
                        raise ApiError(404, {"error": "404 Not Found"})
                    if token is None or c is None:
                        raise msg(404, not_found_text)
                    view = project_view(state, c) if kind == "project" else group_view(state, c)
                    return self.respond(200, view)
                if rest[0] != "variables" or len(rest) > 2:
                    raise ApiError(404, {"error": "404 Not Found"})
                if token is None:
                    raise msg(401, "401 Unauthorized")
                if c is None:
                    raise msg(404, not_found_text)
                if token not in state.tokens:
                    raise msg(403, "403 Forbidden")
                params = self.params(query, raw)
                if len(rest) == 1:
                    return self.collection(c, params, query)
                return self.member(c, rest[1], params)

        def collection(self, c, params, query):
            if self.command == "GET":
                try:
                    per_page = max(1, min(100, int(params.get("per_page", 20))))
                    page = max(1, int(params.get("page", 1)))
                except (TypeError, ValueError):
                    per_page, page = 20, 1
                total = len(c.variables)
                pages = max(1, -(-total // per_page))
                items = c.variables[(page - 1) * per_page: page * per_page]
                headers = {"X-Total": str(total), "X-Total-Pages": str(pages), "X-Per-Page": str(per_page),
                           "X-Page": str(page), "X-Next-Page": str(page + 1) if page < pages else "",
                           "X-Prev-Page": str(page - 1) if page > 1 else ""}
                return self.respond(200, [variable_view(v) for v in items], headers)
            if self.command != "POST":
                raise ApiError(405, {"error": "405 Not Allowed"})
            key = string_param(params, "key")
            value = string_param(params, "value")
            if key is None:
                raise ApiError(400, {"error": "key is missing"})
            if value is None:
                raise ApiError(400, {"error": "value is missing"})
            vtype = string_param(params, "variable_type") or "env_var"
            if vtype not in ("env_var", "file"):
                raise ApiError(400, {"error": "variable_type does not have a valid value"})
            bools = {f: coerce_bool(params, f) for f in BOOL_FIELDS}
            hidden = bool(bools["masked_and_hidden"])
            v = {
                "variable_type": vtype,
                "key": key,
                "value": value,
                "protected": bool(bools["protected"]),
                "masked": bool(bools["masked"]) or hidden,
                "hidden": hidden,
                "raw": bool(bools["raw"]),
                "environment_scope": string_param(params, "environment_scope") or "*",
                "description": string_param(params, "description"),
            }
            validate(v, c.variables)
            c.variables.append(v)
            return self.respond(201, variable_view(v))

        def find(self, c, key, params):
            scope = params.get("filter[environment_scope]")
            if scope is None and isinstance(params.get("filter"), dict):
                scope = params["filter"].get("environment_scope")
            matches = [v for v in c.variables if v["key"] == key and (scope is None or v["environment_scope"] == scope)]
            if not matches:
                raise msg(404, "404 Variable Not Found")
            if len(matches) > 1:
                raise msg(409, "There are multiple variables with provided parameters. "
                               "Please use 'filter[environment_scope]'.")
            return matches[0]

        def member(self, c, key, params):
            v = self.find(c, key, params)
            if self.command == "GET":
                return self.respond(200, variable_view(v))
            if self.command == "DELETE":
                c.variables.remove(v)
                return self.respond(204)
            if self.command != "PUT":
                raise ApiError(405, {"error": "405 Not Allowed"})
            updated = dict(v)
            value = string_param(params, "value")
            if value is not None:
                updated["value"] = value
            vtype = string_param(params, "variable_type")
            if vtype is not None:
                if vtype not in ("env_var", "file"):
                    raise ApiError(400, {"error": "variable_type does not have a valid value"})
                updated["variable_type"] = vtype
            for f in ("protected", "masked", "raw"):
                b = coerce_bool(params, f)
                if b is not None:
                    updated[f] = b
            if updated["hidden"]:
                updated["masked"] = True
            scope = string_param(params, "environment_scope")
            if scope is not None:
                updated["environment_scope"] = scope
            if "description" in params:
                updated["description"] = string_param(params, "description")
            validate(updated, c.variables, replacing=v)
            v.update(updated)
            return self.respond(200, variable_view(v))

    return Handler


def main():
    ap = argparse.ArgumentParser(description="Fake GitLab REST API v4 (CI/CD variables) for tests")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--token", action="append", default=[], help="a Maintainer token (repeatable)")
    ap.add_argument("--readonly-token", action="append", default=[], help="a Developer token (repeatable)")
    ap.add_argument("--project", action="append", default=[], help="GROUP/PROJECT:ID (repeatable)")
    ap.add_argument("--group", action="append", default=[], help="GROUP:ID (repeatable)")
    args = ap.parse_args()
    state = State(args.token, args.readonly_token, args.project, args.group)
    srv = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(state))
    srv.daemon_threads = True
    print(f"PORT={srv.server_address[1]}", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

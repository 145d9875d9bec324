#!/usr/bin/env python3
# Stands in for the Kubernetes API server's TokenReview endpoint
# (POST /apis/authentication.k8s.io/v1/tokenreviews, authentication.k8s.io/v1),
# the one call Vault's / OpenBao's kubernetes auth method makes to check a
# service-account token. kmock (our Kubernetes emulator) stores objects but does
# not evaluate TokenReviews, so this fake answers them from a fixed table:
#   --token TOKEN=NAMESPACE/SERVICEACCOUNT   (repeatable), or
#   --tokens-file FILE with one such line per token, re-read on every review so
#   a test can expire a token (as the real server does when one is rotated out).
# A known token is authenticated as system:serviceaccount:NAMESPACE:SERVICEACCOUNT;
# any other token gets status.authenticated=false, as the real API server answers.
# The reviewer's own bearer token (Authorization header) must be one of the known
# tokens too, like a real server requires an authenticated reviewer (RBAC on
# tokenreviews is not modelled). Binds 127.0.0.1 only; prints PORT=<n> first.
# Logs request lines only, never tokens.
import argparse
import base64
import json
import sys
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PATH = "/apis/authentication.k8s.io/v1/tokenreviews"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--token", action="append", default=[], help="TOKEN=NAMESPACE/SA")
    ap.add_argument("--tokens-file", help="file of TOKEN=NAMESPACE/SA lines, re-read per review")
    args = ap.parse_args()
    uids = {}

    def known_tokens():
        lines = list(args.token)
        if args.tokens_file:
            with open(args.tokens_file) as f:
                lines += [l.strip() for l in f if l.strip()]
        table = {}
        for t in lines:
            tok, _, who = t.partition("=")
            ns, _, sa = who.partition("/")
            uid = uids.setdefault(tok, token_uid(tok) or str(uuid.uuid4()))
            table[tok] = (ns, sa, uid)
        return table

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *a):
            sys.stderr.write("tokenreview: %s\n" % (fmt % a))

        def send_json(self, code, body):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if self.path.split("?")[0] != PATH:
                return self.send_json(404, status_error(404, "NotFound", "the server could not find the requested resource"))
            table = known_tokens()
            auth = self.headers.get("Authorization", "")
            if not auth.startswith("Bearer ") or auth[7:] not in table:
                return self.send_json(401, status_error(401, "Unauthorized", "Unauthorized"))
            try:
                review = json.loads(raw)
                token = review["spec"]["token"]
            except (ValueError, KeyError, TypeError):
                return self.send_json(400, status_error(400, "BadRequest", "malformed TokenReview"))
            review.setdefault("metadata", {})["creationTimestamp"] = None
            if token in table:
                ns, sa, uid = table[token]
                review["status"] = {
                    "authenticated": True,
                    "user": {
                        "username": f"system:serviceaccount:{ns}:{sa}",
                        "uid": uid,
                        "groups": ["system:serviceaccounts", f"system:serviceaccounts:{ns}", "system:authenticated"],
                    },
                    "audiences": review.get("spec", {}).get("audiences") or ["https://kubernetes.default.svc"],
                }
            else:
                review["status"] = {"authenticated": False, "error": "invalid bearer token"}
            self.send_json(201, review)

    srv = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"PORT={srv.server_address[1]}", flush=True)
    srv.serve_forever()


def token_uid(token):
    """The service account uid a JWT-shaped token claims (legacy or projected
    layout), so the review agrees with the token as a real API server's would."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return None
    return (claims.get("kubernetes.io/serviceaccount/service-account.uid")
            or claims.get("kubernetes.io", {}).get("serviceaccount", {}).get("uid"))


def status_error(code, reason, message):
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


if __name__ == "__main__":
    main()

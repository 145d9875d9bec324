#!/usr/bin/env python3
# Self-test of the fake GitHub and GitLab REST APIs (github_api.py,
# gitlab_api.py): starts each as a subprocess on 127.0.0.1, drives every
# endpoint including the error paths with urllib, does a full libsodium sealed
# box round trip with PyNaCl, and checks that no secret value or token reaches
# the fakes' logs. Run: python3 tests/fakes/test_fakes.py
import base64
import json
import os
import subprocess
import sys
import tempfile
import unittest
import urllib.error
import urllib.parse
import urllib.request

from nacl.public import PublicKey, SealedBox

HERE = os.path.dirname(os.path.abspath(__file__))
UA = "keybroker-fake-selftest/1"


class Fake:
    """A fake server subprocess: PORT=<n> on stdout line 1, logs to a temp file."""

    def __init__(self, script, args):
        self.log = tempfile.NamedTemporaryFile(prefix="fake-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, script), "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self.proc.stdout.readline().strip()
        if not line.startswith("PORT="):
            self.stop()
            raise RuntimeError(f"{script} did not print PORT=: {line!r}")
        self.base = f"http://127.0.0.1:{int(line[5:])}"

    def request(self, method, path, body=None, headers=None, form=None):
        data = None
        hdrs = {"User-Agent": UA}
        hdrs.update(headers or {})
        if body is not None:
            data = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        elif form is not None:
            data = urllib.parse.urlencode(form).encode()
            hdrs.setdefault("Content-Type", "application/x-www-form-urlencoded")
        hdrs = {k: v for k, v in hdrs.items() if v is not None}
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                status, raw, rh = r.status, r.read(), r.headers
        except urllib.error.HTTPError as e:
            status, raw, rh = e.code, e.read(), e.headers
        ctype = rh.get("Content-Type", "")
        parsed = json.loads(raw) if raw and "json" in ctype else raw.decode()
        return status, parsed, rh

    def logs(self):
        with open(self.log.name) as f:
            return f.read()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.log.close()
        os.unlink(self.log.name)


def seal(public_key_b64, plaintext):
    box = SealedBox(PublicKey(base64.b64decode(public_key_b64)))
    return base64.b64encode(box.encrypt(plaintext.encode())).decode()


GH_TOKEN = "ghp_fulltoken0000000000000000000000000"
GH_RO = "github_pat_readonly000000000000000000"
PEM_SECRET = "-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\nc2VjcmV0LWtleS1ieXRlcw==\n-----END ENCRYPTED SIGSTORE PRIVATE KEY-----\n"
PASSWORD_SECRET = "correct-horse-battery-staple-7f3a9c"


class GitHubFakeTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.gh = Fake("github_api.py", ["--token", GH_TOKEN, "--readonly-token", GH_RO,
                                        "--repo", "octo/widgets", "--org", "octo-org",
                                        "--environment", "octo/widgets:production"])

    @classmethod
    def tearDownClass(cls):
        cls.gh.stop()

    def call(self, method, path, body=None, token=GH_TOKEN, scheme="Bearer", **kw):
        headers = kw.pop("headers", {})
        if token is not None:
            headers["Authorization"] = f"{scheme} {token}"
        headers.setdefault("X-GitHub-Api-Version", "2022-11-28")
        headers.setdefault("Accept", "application/vnd.github+json")
        return self.gh.request(method, path, body, headers)

    def secrets_of(self, scope):
        status, body, _ = self.gh.request("GET", "/_fake/secrets/" + scope)
        self.assertEqual(status, 200)
        return body

    def put_secret(self, scope_path, name, value, extra=None):
        s, key, _ = self.call("GET", f"{scope_path}/secrets/public-key")
        self.assertEqual(s, 200)
        body = {"encrypted_value": seal(key["key"], value), "key_id": key["key_id"]}
        body.update(extra or {})
        return self.call("PUT", f"{scope_path}/secrets/{name}", body)

    def test_public_key_shape(self):
        for path in ("/repos/octo/widgets/actions", "/orgs/octo-org/actions",
                     "/repos/octo/widgets/environments/production"):
            s, key, h = self.call("GET", f"{path}/secrets/public-key")
            self.assertEqual(s, 200, path)
            self.assertEqual(set(key), {"key_id", "key"})
            self.assertIsInstance(key["key_id"], str)
            self.assertEqual(len(base64.b64decode(key["key"])), 32)
            self.assertEqual(h["X-GitHub-Api-Version-Selected"], "2022-11-28")

    def test_repo_secret_round_trip(self):
        s, body, _ = self.put_secret("/repos/octo/widgets/actions", "COSIGN_PRIVATE_KEY", PEM_SECRET)
        self.assertEqual((s, body), (201, {}))
        s, _, _ = self.put_secret("/repos/octo/widgets/actions", "cosign_password", PASSWORD_SECRET)
        self.assertEqual(s, 201)
        s, body, _ = self.put_secret("/repos/octo/widgets/actions", "COSIGN_PASSWORD", PASSWORD_SECRET + "-2")
        self.assertEqual((s, body), (204, ""))  # update
        got = self.secrets_of("repos/octo/widgets")
        self.assertEqual(got["secrets"]["COSIGN_PRIVATE_KEY"], PEM_SECRET)
        self.assertEqual(got["secrets"]["COSIGN_PASSWORD"], PASSWORD_SECRET + "-2")
        s, meta, _ = self.call("GET", "/repos/octo/widgets/actions/secrets/COSIGN_PASSWORD")
        self.assertEqual(s, 200)
        self.assertEqual(set(meta), {"name", "created_at", "updated_at"})
        s, lst, _ = self.call("GET", "/repos/octo/widgets/actions/secrets")
        self.assertEqual(s, 200)
        self.assertGreaterEqual(lst["total_count"], 2)
        self.assertNotIn("value", json.dumps(lst))

    def test_org_secret_requires_visibility(self):
        s, key, _ = self.call("GET", "/orgs/octo-org/actions/secrets/public-key")
        body = {"encrypted_value": seal(key["key"], "x" * 12), "key_id": key["key_id"]}
        s, err, _ = self.call("PUT", "/orgs/octo-org/actions/secrets/COSIGN_PASSWORD", body)
        self.assertEqual(s, 422)
        self.assertIn('"visibility" wasn\'t supplied', err["message"])
        s, _, _ = self.put_secret("/orgs/octo-org/actions", "COSIGN_PASSWORD", PASSWORD_SECRET, {"visibility": "private"})
        self.assertEqual(s, 201)
        got = self.secrets_of("orgs/octo-org")
        self.assertEqual(got["secrets"]["COSIGN_PASSWORD"], PASSWORD_SECRET)
        self.assertEqual(got["visibility"]["COSIGN_PASSWORD"], "private")
        s, meta, _ = self.call("GET", "/orgs/octo-org/actions/secrets/COSIGN_PASSWORD")
        self.assertEqual(meta["visibility"], "private")

    def test_environment_secret_uses_environment_key(self):
        s, repo_key, _ = self.call("GET", "/repos/octo/widgets/actions/secrets/public-key")
        body = {"encrypted_value": seal(repo_key["key"], "env-secret-1"), "key_id": repo_key["key_id"]}
        s, err, _ = self.call("PUT", "/repos/octo/widgets/environments/production/secrets/DEPLOY", body)
        self.assertEqual(s, 422)  # the repository's key is not the environment's
        s, _, _ = self.put_secret("/repos/octo/widgets/environments/production", "DEPLOY", "env-secret-1")
        self.assertEqual(s, 201)
        self.assertEqual(self.secrets_of("repos/octo/widgets/environments/production")["secrets"]["DEPLOY"], "env-secret-1")
        s, _, _ = self.call("GET", "/repos/octo/widgets/environments/staging/secrets/public-key")
        self.assertEqual(s, 404)

    def test_bad_encryption_is_422(self):
        s, key, _ = self.call("GET", "/repos/octo/widgets/actions/secrets/public-key")
        # right key_id, but sealed for some other key
        other = base64.b64encode(bytes(PublicKey(b"\x01" * 32))).decode()
        s, err, _ = self.call("PUT", "/repos/octo/widgets/actions/secrets/BAD",
                              {"encrypted_value": seal(other, "nope"), "key_id": key["key_id"]})
        self.assertEqual(s, 422)
        self.assertIn("could not be decrypted", err["message"])
        self.assertEqual(err["status"], "422")
        s, err, _ = self.call("PUT", "/repos/octo/widgets/actions/secrets/BAD",
                              {"encrypted_value": base64.b64encode(b"plaintext, not a box").decode(),
                               "key_id": key["key_id"]})
        self.assertEqual(s, 422)
        s, err, _ = self.call("PUT", "/repos/octo/widgets/actions/secrets/BAD",
                              {"encrypted_value": "not base64!", "key_id": key["key_id"]})
        self.assertEqual(s, 422)
        s, err, _ = self.call("PUT", "/repos/octo/widgets/actions/secrets/BAD",
                              {"encrypted_value": seal(key["key"], "v"), "key_id": "1"})
        self.assertEqual(s, 422)
        s, err, _ = self.call("PUT", "/repos/octo/widgets/actions/secrets/BAD", {"key_id": key["key_id"]})
        self.assertEqual(s, 422)
        s, err, _ = self.call("PUT", "/repos/octo/widgets/actions/secrets/GITHUB_TOKEN",
                              {"encrypted_value": seal(key["key"], "v"), "key_id": key["key_id"]})
        self.assertEqual(s, 422)
        self.assertNotIn("BAD", self.secrets_of("repos/octo/widgets")["secrets"])

    def test_key_rotation_invalidates_old_key_id(self):
        s, old, _ = self.call("GET", "/orgs/octo-org/actions/secrets/public-key")
        s, new, _ = self.gh.request("POST", "/_fake/rotate-key/orgs/octo-org")
        self.assertEqual(s, 200)
        self.assertNotEqual(old["key_id"], new["key_id"])
        s, _, _ = self.call("PUT", "/orgs/octo-org/actions/secrets/ROTATED",
                            {"encrypted_value": seal(old["key"], "v"), "key_id": old["key_id"], "visibility": "all"})
        self.assertEqual(s, 422)
        s, _, _ = self.put_secret("/orgs/octo-org/actions", "ROTATED", "rotated-ok", {"visibility": "all"})
        self.assertEqual(s, 201)

    def test_delete_secret(self):
        self.put_secret("/repos/octo/widgets/actions", "TEMP", "temporary")
        s, _, _ = self.call("DELETE", "/repos/octo/widgets/actions/secrets/TEMP")
        self.assertEqual(s, 204)
        s, _, _ = self.call("GET", "/repos/octo/widgets/actions/secrets/TEMP")
        self.assertEqual(s, 404)

    def test_variables_repo_org_env(self):
        for base, extra in (("/repos/octo/widgets/actions", {}),
                            ("/orgs/octo-org/actions", {"visibility": "all"}),
                            ("/repos/octo/widgets/environments/production", {})):
            pem = "-----BEGIN PUBLIC KEY-----\nMFkw\n-----END PUBLIC KEY-----\n"
            s, body, _ = self.call("POST", f"{base}/variables", {"name": "COSIGN_PUBLIC_KEY", "value": pem, **extra})
            self.assertEqual((s, body), (201, {}), base)
            s, err, _ = self.call("POST", f"{base}/variables", {"name": "cosign_public_key", "value": pem, **extra})
            self.assertEqual(s, 409, base)
            self.assertEqual(err["message"], "Already exists - Variable already exists")
            s, var, _ = self.call("GET", f"{base}/variables/COSIGN_PUBLIC_KEY")
            self.assertEqual(s, 200)
            self.assertEqual(var["name"], "COSIGN_PUBLIC_KEY")
            self.assertEqual(var["value"], pem)
            self.assertIn("created_at", var)
            s, body, _ = self.call("PATCH", f"{base}/variables/COSIGN_PUBLIC_KEY", {"name": "COSIGN_PUBLIC_KEY", "value": "new"})
            self.assertEqual(s, 204)
            s, var, _ = self.call("GET", f"{base}/variables/COSIGN_PUBLIC_KEY")
            self.assertEqual(var["value"], "new")
            s, lst, _ = self.call("GET", f"{base}/variables")
            self.assertEqual(lst["total_count"], 1)
            s, _, _ = self.call("PATCH", f"{base}/variables/MISSING", {"value": "x"})
            self.assertEqual(s, 404)
            s, _, _ = self.call("GET", f"{base}/variables/MISSING")
            self.assertEqual(s, 404)
        s, var, _ = self.call("GET", "/orgs/octo-org/actions/variables/COSIGN_PUBLIC_KEY")
        self.assertEqual(var["visibility"], "all")
        s, err, _ = self.call("POST", "/orgs/octo-org/actions/variables", {"name": "NOVIS", "value": "v"})
        self.assertEqual(s, 422)
        s, _, _ = self.call("DELETE", "/repos/octo/widgets/actions/variables/COSIGN_PUBLIC_KEY")
        self.assertEqual(s, 204)

    def test_auth_errors(self):
        s, err, _ = self.call("GET", "/repos/octo/widgets/actions/secrets/public-key", token="wrong")
        self.assertEqual(s, 401)
        self.assertEqual(err["message"], "Bad credentials")
        self.assertIn("documentation_url", err)
        s, err, _ = self.call("GET", "/repos/octo/widgets/actions/secrets/public-key", token=None)
        self.assertEqual(s, 401)
        s, _, _ = self.call("GET", "/repos/octo/widgets/actions/secrets/public-key", scheme="token")
        self.assertEqual(s, 200)
        # read-only token: reads work, writes are 403
        s, key, _ = self.call("GET", "/repos/octo/widgets/actions/secrets/public-key", token=GH_RO)
        self.assertEqual(s, 200)
        s, err, _ = self.call("PUT", "/repos/octo/widgets/actions/secrets/RO",
                              {"encrypted_value": seal(key["key"], "v"), "key_id": key["key_id"]}, token=GH_RO)
        self.assertEqual(s, 403)
        self.assertEqual(err["message"], "Resource not accessible by personal access token")
        s, _, _ = self.call("POST", "/repos/octo/widgets/actions/variables", {"name": "RO", "value": "v"}, token=GH_RO)
        self.assertEqual(s, 403)
        # unknown repo / org
        s, err, _ = self.call("GET", "/repos/octo/nope/actions/secrets/public-key")
        self.assertEqual((s, err["message"]), (404, "Not Found"))
        s, err, _ = self.call("GET", "/orgs/nope/actions/secrets/public-key")
        self.assertEqual(s, 404)
        s, _, _ = self.call("GET", "/repos/OCTO/Widgets/actions/secrets/public-key")
        self.assertEqual(s, 200)  # names are case-insensitive
        # GitHub refuses requests without a User-Agent
        s, text, _ = self.call("GET", "/repos/octo/widgets/actions/secrets/public-key", headers={"User-Agent": ""})
        self.assertEqual(s, 403)
        self.assertIn("User-Agent", text)

    def test_zz_logs_hold_no_secrets_and_requests_are_recorded(self):
        s, reqs, _ = self.gh.request("GET", "/_fake/requests")
        self.assertEqual(s, 200)
        self.assertTrue(any(r["api_version"] == "2022-11-28" and r["user_agent"] == UA for r in reqs))
        self.assertNotIn(GH_TOKEN, json.dumps(reqs))
        logs = self.gh.logs()
        self.assertIn("PUT /repos/octo/widgets/actions/secrets/COSIGN_PRIVATE_KEY 201", logs)
        for needle in (PEM_SECRET.splitlines()[1], PASSWORD_SECRET, GH_TOKEN, GH_RO, "encrypted_value"):
            self.assertNotIn(needle, logs)


GL_TOKEN = "glpat-maintainer0000000000"
GL_RO = "glpat-developer00000000000"


class GitLabFakeTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.gl = Fake("gitlab_api.py", ["--token", GL_TOKEN, "--readonly-token", GL_RO,
                                        "--project", "acme/sub/app:42", "--group", "acme:7", "--group", "acme/sub:8",
                                        "--project", "lone/tool:43"])

    @classmethod
    def tearDownClass(cls):
        cls.gl.stop()

    def call(self, method, path, body=None, token=GL_TOKEN, header="PRIVATE-TOKEN", form=None):
        headers = {}
        if token is not None:
            headers[header] = token if header == "PRIVATE-TOKEN" else f"Bearer {token}"
        return self.gl.request(method, "/api/v4" + path, body, headers, form=form)

    def test_project_and_group_lookup(self):
        for ident in ("42", "acme%2Fsub%2Fapp", "ACME%2Fsub%2FApp"):
            s, p, _ = self.call("GET", f"/projects/{ident}")
            self.assertEqual(s, 200, ident)
            self.assertEqual(p["id"], 42)
            self.assertEqual(p["path_with_namespace"], "acme/sub/app")
            self.assertEqual(p["namespace"]["id"], 8)
            self.assertEqual(p["namespace"]["full_path"], "acme/sub")
        s, g, _ = self.call("GET", "/groups/acme%2Fsub")
        self.assertEqual((s, g["id"], g["full_path"], g["parent_id"]), (200, 8, "acme/sub", 7))
        s, g, _ = self.call("GET", "/groups/7", header="Authorization")
        self.assertEqual((s, g["full_path"]), (200, "acme"))
        # a project's namespace is always a group, even if not configured
        s, p, _ = self.call("GET", "/projects/lone%2Ftool")
        s, g, _ = self.call("GET", f"/groups/{p['namespace']['id']}")
        self.assertEqual((s, g["full_path"]), (200, "lone"))
        s, err, _ = self.call("GET", "/projects/999")
        self.assertEqual((s, err), (404, {"message": "404 Project Not Found"}))
        s, err, _ = self.call("GET", "/groups/nope")
        self.assertEqual((s, err), (404, {"message": "404 Group Not Found"}))
        s, err, _ = self.call("GET", "/projects/42", token=None)
        self.assertEqual(s, 404)  # private project, anonymous

    def test_project_variable_crud(self):
        base = "/projects/acme%2Fsub%2Fapp/variables"
        s, v, _ = self.call("POST", base, {"key": "COSIGN_PASSWORD", "value": PASSWORD_SECRET, "masked": True,
                                           "protected": True, "description": "cosign key password"})
        self.assertEqual(s, 201)
        self.assertEqual(v, {"variable_type": "env_var", "key": "COSIGN_PASSWORD", "value": PASSWORD_SECRET,
                             "protected": True, "masked": True, "hidden": False, "raw": False,
                             "environment_scope": "*", "description": "cosign key password"})
        s, err, _ = self.call("POST", base, {"key": "COSIGN_PASSWORD", "value": PASSWORD_SECRET})
        self.assertEqual((s, err), (400, {"message": {"key": ["(COSIGN_PASSWORD) has already been taken"]}}))
        # same key, other environment scope is allowed; then a filter is needed
        s, _, _ = self.call("POST", base, {"key": "COSIGN_PASSWORD", "value": "other-scope", "environment_scope": "prod"})
        self.assertEqual(s, 201)
        s, err, _ = self.call("GET", base + "/COSIGN_PASSWORD")
        self.assertEqual(s, 409)
        s, v, _ = self.call("GET", base + "/COSIGN_PASSWORD?filter%5Benvironment_scope%5D=%2A")
        self.assertEqual((s, v["value"]), (200, PASSWORD_SECRET))
        s, _, _ = self.call("DELETE", base + "/COSIGN_PASSWORD?filter[environment_scope]=prod")
        self.assertEqual(s, 204)
        # form-encoded update, as curl --form / --data would send it
        s, v, _ = self.call("PUT", "/projects/42/variables/COSIGN_PASSWORD", form={"value": PASSWORD_SECRET + "-v2"})
        self.assertEqual((s, v["value"], v["masked"], v["protected"]), (200, PASSWORD_SECRET + "-v2", True, True))
        s, v, _ = self.call("GET", "/projects/42/variables/COSIGN_PASSWORD")
        self.assertEqual(v["value"], PASSWORD_SECRET + "-v2")
        s, pem, _ = self.call("POST", base, {"key": "COSIGN_PRIVATE_KEY", "value": PEM_SECRET, "variable_type": "env_var"})
        self.assertEqual((s, pem["value"]), (201, PEM_SECRET))
        s, lst, h = self.call("GET", base)
        self.assertEqual((s, h["X-Total"]), (200, "2"))
        self.assertEqual(sorted(x["key"] for x in lst), ["COSIGN_PASSWORD", "COSIGN_PRIVATE_KEY"])
        s, _, _ = self.call("DELETE", base + "/COSIGN_PRIVATE_KEY")
        self.assertEqual(s, 204)
        s, err, _ = self.call("GET", base + "/COSIGN_PRIVATE_KEY")
        self.assertEqual((s, err), (404, {"message": "404 Variable Not Found"}))
        s, err, _ = self.call("PUT", base + "/COSIGN_PRIVATE_KEY", {"value": "x"})
        self.assertEqual(s, 404)

    def test_masking_rules(self):
        base = "/groups/7/variables"
        invalid = {"message": {"value": ["is invalid"]}}
        for bad in ("short7c", "has space in it", "two\nlines-here", "pipe|char-x", PEM_SECRET):
            s, err, _ = self.call("POST", base, {"key": "M", "value": bad, "masked": True})
            self.assertEqual((s, err), (400, invalid), repr(bad))
        for good in ("abcdefgh", "a+b/c=d@e:f.g~h-i_j", "QUJDREVGR0g="):
            s, _, _ = self.call("POST", base, {"key": "M", "value": good, "masked": True})
            self.assertEqual(s, 201, good)
            self.call("DELETE", base + "/M")
        # raw masked variables allow any non-whitespace characters
        s, _, _ = self.call("POST", base, {"key": "M", "value": "pipe|char-x$", "masked": True, "raw": True})
        self.assertEqual(s, 201)
        s, err, _ = self.call("PUT", base + "/M", {"raw": False})
        self.assertEqual((s, err), (400, invalid))
        # masking an existing unmaskable value fails the same way
        s, _, _ = self.call("POST", base, {"key": "PLAIN", "value": "short"})
        self.assertEqual(s, 201)
        s, err, _ = self.call("PUT", base + "/PLAIN", {"masked": "true"})
        self.assertEqual((s, err), (400, invalid))
        # unmasked values are unrestricted
        s, _, _ = self.call("POST", base, {"key": "PEM", "value": PEM_SECRET, "variable_type": "file"})
        self.assertEqual(s, 201)

    def test_hidden_variables_return_no_value(self):
        base = "/groups/acme%2Fsub/variables"
        s, v, _ = self.call("POST", base, {"key": "HIDDEN_ONE", "value": "hidden-value-1", "masked_and_hidden": True})
        self.assertEqual((s, v["hidden"], v["masked"], v["value"]), (201, True, True, None))
        s, v, _ = self.call("GET", base + "/HIDDEN_ONE")
        self.assertIsNone(v["value"])
        s, raw, _ = self.gl.request("GET", "/_fake/variables/groups/8")
        self.assertEqual([x["value"] for x in raw if x["key"] == "HIDDEN_ONE"], ["hidden-value-1"])

    def test_validation_errors(self):
        base = "/projects/42/variables"
        s, err, _ = self.call("POST", base, {"value": "v"})
        self.assertEqual((s, err), (400, {"error": "key is missing"}))
        s, err, _ = self.call("POST", base, {"key": "K"})
        self.assertEqual((s, err), (400, {"error": "value is missing"}))
        s, err, _ = self.call("POST", base, {"key": "BAD-KEY", "value": "v"})
        self.assertEqual(s, 400)
        self.assertIn("key", err["message"])
        s, err, _ = self.call("POST", base, {"key": "K", "value": "v", "variable_type": "secret"})
        self.assertEqual((s, err), (400, {"error": "variable_type does not have a valid value"}))

    def test_auth_errors(self):
        s, err, _ = self.call("GET", "/projects/42/variables", token="nope")
        self.assertEqual((s, err), (401, {"message": "401 Unauthorized"}))
        s, err, _ = self.call("GET", "/projects/42/variables", token=None)
        self.assertEqual((s, err), (401, {"message": "401 Unauthorized"}))
        s, err, _ = self.call("GET", "/projects/42", token="nope", header="Authorization")
        self.assertEqual(s, 401)
        s, _, _ = self.call("GET", "/projects/42", token=GL_RO)
        self.assertEqual(s, 200)
        for method, body in (("GET", None), ("POST", {"key": "RO", "value": "v"})):
            s, err, _ = self.call(method, "/projects/42/variables", body, token=GL_RO)
            self.assertEqual((s, err), (403, {"message": "403 Forbidden"}), method)
        s, err, _ = self.call("GET", "/projects/999/variables")
        self.assertEqual((s, err), (404, {"message": "404 Project Not Found"}))
        s, err, _ = self.call("GET", "/groups/999/variables/X")
        self.assertEqual((s, err), (404, {"message": "404 Group Not Found"}))
        s, err, _ = self.call("GET", "/projects/42/hooks")
        self.assertEqual((s, err), (404, {"error": "404 Not Found"}))

    def test_zz_logs_hold_no_secrets(self):
        logs = self.gl.logs()
        self.assertIn("POST /api/v4/projects/acme%2Fsub%2Fapp/variables 201", logs)
        for needle in (PASSWORD_SECRET, PEM_SECRET.splitlines()[1], GL_TOKEN, GL_RO, "hidden-value-1", "environment_scope"):
            self.assertNotIn(needle, logs)
        s, reqs, _ = self.gl.request("GET", "/_fake/requests")
        self.assertTrue(any(r["auth"] == "private-token" for r in reqs))
        self.assertNotIn(GL_TOKEN, json.dumps(reqs))


def main():
    suite = unittest.defaultTestLoader.loadTestsFromModule(sys.modules[__name__])
    result = unittest.TextTestRunner(verbosity=2).run(suite)
    failed = len(result.failures) + len(result.errors)
    print(f"{result.testsRun - failed} passed, {failed} failed")
    sys.exit(0 if result.wasSuccessful() else 1)


if __name__ == "__main__":
    main()

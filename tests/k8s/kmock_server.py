#!/usr/bin/env python3
"""A Kubernetes API stand-in for keybroker's k8s:// tests: PyPI kmock, patched.

    python3 tests/k8s/kmock_server.py PORT [--max-watch-seconds N]

Serves kmock's KubernetesEmulator (an in-memory object store with list, watch,
get, create, PATCH and delete) on 127.0.0.1:PORT, with the fixes a kube-rs
client needs. Each patch below restores one behaviour of the real API server
(https://kubernetes.io/docs/reference/kubernetes-api/config-and-storage-resources/secret-v1/):

1. PUT (replace) of a named object: kmock only knows PATCH and answers PUT
   with 404; the real server replaces the whole object (data keys missing
   from the body are removed) and emits MODIFIED.
2. Immutable secrets: the real server refuses (422 Invalid) any PUT that
   changes `data`/`stringData` of a secret with `immutable: true`, or sets
   `immutable` back to false; only delete + create replaces one.
3. `fieldSelector=metadata.name=NAME` on list and watch: kmock ignores field
   selectors and streams every secret of the namespace; the real server
   filters (and an RBAC rule limited by resourceNames needs exactly this).
4. Watch timeouts: the real server ends a watch after `timeoutSeconds` (and
   after a randomised --min-request-timeout otherwise); kmock streams
   forever. --max-watch-seconds caps every watch so clients must reconnect.
5. Error bodies: kmock's reasons are prose ("Object Not Found") with a Python
   traceback in `details`; the real server's `reason` is a StatusReason
   (NotFound, AlreadyExists, Invalid, ...) and `details` names the object.
6. metadata.namespace: the real server fills it in from the URL on create and
   replace; kmock stores the body as sent, and its watch then drops every
   event of such an object (its namespace filter compares with None).

Gaps left (covered by keybroker's own tests instead): no resourceVersion on
objects or lists (so no 410 Gone, no optimistic concurrency, no delete
preconditions), no authentication or RBAC, no server-side bookmarks.
"""

import argparse
import asyncio
import signal

import aiohttp.web
import kmock
from kmock._internal import references

SECRETS = references.resource('', 'v1', 'secrets')

REASONS = {
    400: 'BadRequest',
    401: 'Unauthorized',
    403: 'Forbidden',
    404: 'NotFound',
    405: 'MethodNotAllowed',
    409: 'AlreadyExists',
    410: 'Expired',
    422: 'Invalid',
    500: 'InternalError',
}


class SecretsEmulator(kmock.KubernetesEmulator):
    max_watch_seconds: float = 1800.0

    async def _handle(self, request):
        # (6) The server sets metadata.namespace from the URL; kmock stores the
        # body as sent, and then its watch filter drops every event of an
        # object created without it.
        if (
            request.method in (kmock.method.POST, kmock.method.PUT)
            and request.namespace is not None
            and isinstance(request.data, dict)
        ):
            metadata = request.data.setdefault('metadata', {})
            if metadata.get('namespace') not in (None, request.namespace):
                raise kmock.KubernetesError(
                    status=400,
                    message='the namespace of the provided object does not match the namespace sent on the request',
                )
            metadata['namespace'] = request.namespace
        # (1) PUT replaces a named object.
        if (
            request.method == kmock.method.PUT
            and request.resource is not None
            and request.name is not None
            and request.subresource is None
        ):
            return await self._replace(request)
        return await super()._handle(request)

    async def _replace(self, request):
        key = (request.resource, request.namespace, request.name)
        body = request.data if isinstance(request.data, dict) else None
        if body is None:
            raise kmock.KubernetesError(status=400, message='the request body is not a JSON object')
        name = body.get('metadata', {}).get('name')
        if name not in (None, request.name):
            raise kmock.KubernetesError(
                status=400,
                message=f'the name of the object ({name}) does not match the name on the URL ({request.name})',
            )
        async with self._lock:
            if key not in self._objects or self._objects[key].deleted:
                raise kmock.KubernetesError(
                    status=404, message=f'{request.resource.plural} "{request.name}" not found'
                )
            old = self._objects[key].last.raw
            # (2) immutable secrets keep their data.
            if request.resource == SECRETS and old.get('immutable') is True:
                if body.get('immutable') is not True or any(
                    body.get(f) != old.get(f) for f in ('data', 'stringData')
                ):
                    raise kmock.KubernetesError(
                        status=422,
                        message=f'Secret "{request.name}" is invalid: data: Forbidden: field is immutable when `immutable` is set',
                    )
            self._objects[key].create(body)
            raw = self._objects[key].last.raw
            await self._buses[request.resource].put({'type': 'MODIFIED', 'object': raw})
        return aiohttp.web.json_response(raw)

    @staticmethod
    def _selected_name(request):
        """(3) The NAME of fieldSelector=metadata.name=NAME, if given."""
        for term in filter(None, request.params.get('fieldSelector', '').split(',')):
            field, _, value = term.partition('=')
            if field.strip() == 'metadata.name':
                return value.lstrip('=').strip()
        return None

    async def _serve_list(self, request):
        listing = await super()._serve_list(request)
        name = self._selected_name(request)
        if name is not None:
            listing['items'] = [o for o in listing['items'] if o.get('metadata', {}).get('name') == name]
        listing.setdefault('apiVersion', 'v1')
        listing.setdefault('kind', 'SecretList' if request.resource == SECRETS else 'List')
        return listing

    async def _serve_watch(self, request):
        # (4) end the watch after timeoutSeconds, capped by --max-watch-seconds.
        loop = asyncio.get_running_loop()
        try:
            limit = float(request.params.get('timeoutSeconds', self.max_watch_seconds))
        except ValueError:
            limit = self.max_watch_seconds
        deadline = loop.time() + min(limit, self.max_watch_seconds)
        name = self._selected_name(request)
        events = super()._serve_watch(request)
        try:
            while (remaining := deadline - loop.time()) > 0:
                try:
                    item = await asyncio.wait_for(events.__anext__(), remaining)
                except (asyncio.TimeoutError, StopAsyncIteration):
                    break
                if name is not None and isinstance(item, dict):
                    if item.get('object', {}).get('metadata', {}).get('name') != name:
                        continue
                yield item
        finally:
            await events.aclose()

    async def _render_error(self, exc):
        # (5) StatusReason values and object details instead of prose and tracebacks.
        status = exc.status if isinstance(exc, kmock.KubernetesError) else 500
        message = (exc.message if isinstance(exc, kmock.KubernetesError) else None) or repr(exc)
        return aiohttp.web.json_response(
            {
                'apiVersion': 'v1',
                'kind': 'Status',
                'metadata': {},
                'status': 'Failure',
                'message': message,
                'reason': REASONS.get(status, 'Unknown'),
                'code': status,
            },
            status=status,
        )


async def serve(port: int, max_watch_seconds: float) -> None:
    emulator = SecretsEmulator()
    emulator.max_watch_seconds = max_watch_seconds
    # Secrets are served (list answers [] rather than 404) before any exists.
    emulator.resources[SECRETS] = references.ResourceInfo(
        namespaced=True,
        kind='Secret',
        singular='secret',
        verbs={'create', 'delete', 'get', 'list', 'patch', 'update', 'watch'},
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with emulator, kmock.Server(emulator, port=port) as server:
        print(f'kmock: serving the Kubernetes API at {server.url}', flush=True)
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('port', type=int)
    parser.add_argument('--max-watch-seconds', type=float, default=1800.0)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.max_watch_seconds))


if __name__ == '__main__':
    main()

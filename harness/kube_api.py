"""A real HTTP server that speaks the part of the Kubernetes API that kvfleet uses, for tests.

No cluster runs here; the `kubernetes` client talks to this server as it would to an API server:

- `GET /api/v1/namespaces/NS/pods` and `GET /apis/GROUP/VERSION/namespaces/NS/inferencepools`:
  a list (`items`, `metadata.resourceVersion`), filtered by `labelSelector` (`k=v,k2=v2`);
  with `watch=true`: a stream of `{"type", "object"}` lines (ADDED, MODIFIED, DELETED) after
  `resourceVersion`, ending after `timeoutSeconds`; a version older than the last `compact()`
  gets an ERROR event with a 410 Status, as a real server does once its history is gone.
- `GET .../pods/NAME`, `GET .../inferencepools/NAME`: one object, or a 404 Status.
- `Authorization: Bearer TOKEN` is checked when the server has a token (401 otherwise).

Objects are plain dicts; every change bumps one resourceVersion counter, as etcd's revision does.
`kubeconfig(path)` writes a kubeconfig that points at the server.
"""

from __future__ import annotations

import contextlib
import copy
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

PODS = ("", "v1", "pods")


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


def _matches(obj: dict, selector: dict[str, str]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


class KubeAPI:
    def __init__(self, token: str | None = "test-token", host: str = "127.0.0.1", port: int = 0) -> None:
        self.token = token
        self.host = host
        self.port = port  # 0: a free one
        # (group, version, plural) -> namespace -> name -> object
        self._objects: dict[tuple[str, str, str], dict[str, dict[str, dict]]] = {}
        self._events: list[tuple[int, str, tuple[str, str, str], str, dict]] = []  # rv, type, kind, ns, object
        self._rv = 100
        self._compacted = 0  # versions at or below this are gone
        self._cond = threading.Condition()
        self._stopping = False
        self._conns: set[socket.socket] = set()  # open client connections, cut by stop()
        self.requests: list[str] = []  # paths asked, in order (with their query)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "KubeAPI":
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, and chunked watch streams as a real server sends

            def setup(self):
                super().setup()
                with api._cond:
                    api._conns.add(self.connection)

            def finish(self):
                with api._cond:
                    api._conns.discard(self.connection)
                super().finish()

            def do_GET(self):  # noqa: N802 - http.server's name
                api._handle(self)

            def log_message(self, *args):
                pass

        # HTTPServer sets SO_REUSEADDR: a new server may take a stopped one's port (a restart)
        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="kube-api", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection (keep-alive ones too): an outage."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            with self._cond:
                conns = list(self._conns)
            for c in conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> "KubeAPI":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def kubeconfig(self, path: str, namespace: str = "default") -> str:
        """Write a kubeconfig (JSON is YAML) for this server at `path`; returns the path."""
        user = {"token": self.token} if self.token else {}
        doc = {"apiVersion": "v1", "kind": "Config", "current-context": "test",
               "clusters": [{"name": "test", "cluster": {"server": self.url}}],
               "users": [{"name": "test", "user": user}],
               "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test", "namespace": namespace}}]}
        with open(path, "w") as f:
            json.dump(doc, f)
        return path

    # ------------------------------------------------------------------ objects
    def put(self, kind: tuple[str, str, str], obj: dict) -> dict:
        """Create or replace `obj` (its metadata.namespace and name); returns the stored copy."""
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        ns, name = meta.setdefault("namespace", "default"), meta["name"]
        with self._cond:
            self._rv += 1
            meta["resourceVersion"] = str(self._rv)
            bucket = self._objects.setdefault(kind, {}).setdefault(ns, {})
            what = "MODIFIED" if name in bucket else "ADDED"
            bucket[name] = obj
            self._events.append((self._rv, what, kind, ns, copy.deepcopy(obj)))
            self._cond.notify_all()
        return obj

    def delete(self, kind: tuple[str, str, str], namespace: str, name: str) -> None:
        with self._cond:
            obj = self._objects.get(kind, {}).get(namespace, {}).pop(name)
            self._rv += 1
            obj["metadata"]["resourceVersion"] = str(self._rv)
            self._events.append((self._rv, "DELETED", kind, namespace, obj))
            self._cond.notify_all()

    def get(self, kind: tuple[str, str, str], namespace: str, name: str) -> dict | None:
        with self._cond:
            obj = self._objects.get(kind, {}).get(namespace, {}).get(name)
            return copy.deepcopy(obj) if obj is not None else None

    def compact(self) -> None:
        """Forget the history so far: a watch from an older resourceVersion gets 410 Gone."""
        with self._cond:
            self._compacted = self._rv
            self._events.clear()

    # Shorthands for the objects kvfleet reads ----------------------------------------------
    def put_pod(self, name: str, ip: str | None, labels: dict[str, str], ready: bool = True,
                namespace: str = "default", ports: dict[str, int] | None = None, terminating: bool = False) -> dict:
        conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
        meta = {"name": name, "namespace": namespace, "labels": labels}
        if terminating:
            meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        status = {"phase": "Running", "conditions": conditions}
        if ip:
            status["podIP"] = ip
        return self.put(PODS, {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "status": status,
                               "spec": {"containers": [{"name": "replica", "ports": [
                                   {"name": n, "containerPort": p} for n, p in (ports or {}).items()]}]}})

    def put_pool(self, name: str, labels: dict[str, str], port: int, namespace: str = "default",
                 version: str = "v1", picker: str = "kvfleet-picker") -> dict:
        """An InferencePool in the shape of the Inference Extension's CRD for `version`."""
        if version == "v1":
            group = "inference.networking.k8s.io"
            spec = {"selector": {"matchLabels": labels}, "targetPorts": [{"number": port}],
                    "endpointPickerRef": {"name": picker, "port": {"number": 9002}}}
        else:
            group = "inference.networking.x-k8s.io"
            spec = {"selector": labels, "targetPortNumber": port, "extensionRef": {"name": picker}}
        return self.put((group, version, "inferencepools"), {
            "apiVersion": f"{group}/{version}", "kind": "InferencePool",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec})

    # ------------------------------------------------------------------ HTTP
    def _route(self, path: str) -> tuple[tuple[str, str, str], str, str | None] | None:
        parts = [p for p in path.split("/") if p]
        # /api/v1/namespaces/NS/PLURAL[/NAME]  or  /apis/GROUP/VERSION/namespaces/NS/PLURAL[/NAME]
        if parts[:1] == ["api"] and len(parts) in (5, 6) and parts[2] == "namespaces":
            return ("", parts[1], parts[4]), parts[3], (parts[5] if len(parts) == 6 else None)
        if parts[:1] == ["apis"] and len(parts) in (6, 7) and parts[3] == "namespaces":
            return (parts[1], parts[2], parts[5]), parts[4], (parts[6] if len(parts) == 7 else None)
        return None

    def _send(self, h: BaseHTTPRequestHandler, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        u = urlparse(h.path)
        self.requests.append(h.path)
        if self.token and h.headers.get("Authorization") != f"Bearer {self.token}":
            return self._send(h, 401, _status(401, "Unauthorized", "Unauthorized"))
        route = self._route(u.path)
        if route is None:
            return self._send(h, 404, _status(404, "NotFound", f"the server could not find {u.path}"))
        kind, ns, name = route
        q = {k: v[-1] for k, v in parse_qs(u.query).items()}
        if kind not in self._objects and kind != PODS:
            return self._send(h, 404, _status(404, "NotFound", f"the server could not find the requested resource"))
        if name is not None:
            obj = self.get(kind, ns, name)
            if obj is None:
                return self._send(h, 404, _status(404, "NotFound", f'{kind[2]} "{name}" not found'))
            return self._send(h, 200, obj)
        selector = dict(p.split("=", 1) for p in q.get("labelSelector", "").split(",") if "=" in p)
        if q.get("watch") in ("true", "1"):
            return self._watch(h, kind, ns, selector, int(q.get("resourceVersion") or 0),
                               float(q.get("timeoutSeconds") or 30))
        with self._cond:
            items = [copy.deepcopy(o) for o in self._objects.get(kind, {}).get(ns, {}).values()
                     if _matches(o, selector)]
            rv = self._rv
        self._send(h, 200, {"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": str(rv)},
                            "items": items})

    def _watch(self, h: BaseHTTPRequestHandler, kind, ns: str, selector: dict[str, str], since: int,
               timeout_s: float) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")  # one chunk per event, as the API server sends them
        h.end_headers()

        def line(ev: dict) -> None:
            data = json.dumps(ev).encode() + b"\n"
            h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            h.wfile.flush()

        try:
            self._stream(h, line, kind, ns, selector, since, timeout_s)
            h.wfile.write(b"0\r\n\r\n")
            h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away

    def _stream(self, h, line, kind, ns: str, selector: dict[str, str], since: int, timeout_s: float) -> None:
        with self._cond:
            if since and since < self._compacted:
                line({"type": "ERROR", "object": _status(410, "Expired", f"too old resource version: {since}")})
                return
        end = threading.Event()
        timer = threading.Timer(timeout_s, lambda: (end.set(), self._wake()))
        timer.start()
        sent = since
        try:
            while not end.is_set():
                with self._cond:
                    batch = [e for e in self._events if e[0] > sent and e[2] == kind and e[3] == ns]
                    if not batch:
                        if self._stopping:
                            return
                        self._cond.wait(timeout=1.0)
                        continue
                for rv, what, _, _, obj in batch:
                    sent = rv
                    if _matches(obj, selector):
                        line({"type": what, "object": obj})
        finally:
            timer.cancel()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

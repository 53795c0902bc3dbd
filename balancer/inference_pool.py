"""Replicas from a Gateway API Inference Extension `InferencePool`, through the Kubernetes API.

The pool names its model servers by a label selector and a target port; every Ready pod it
selects, with an IP, is a replica at `http://POD_IP:PORT`. The watcher reads the pool, lists the
matching pods, then watches them from the list's `resourceVersion` (the list-then-watch protocol
of Kubernetes clients), and hands the replica set to its `Membership` after every change, the same
path DNS discovery feeds (balancer/membership.py).

    start()  get the pool (v1, else v1alpha2), list its pods -> the first replica set; errors
             here are fatal and say what to do (bad kubeconfig, no pool, no permission)
    run()    watch the pods from the list's resourceVersion, `resync_s` at a time; between
             watches, read the pool again (a new selector or port lists the pods again); a 410
             Gone (the version was compacted) lists again; an unreachable API keeps the current
             replicas and retries every `resync_s`

Field names, from the Inference Extension's published CRDs (config/crd/bases/ of
kubernetes-sigs/gateway-api-inference-extension):
- `inference.networking.k8s.io/v1`: `spec.selector.matchLabels` (a map), `spec.targetPorts`
  (a list of one `{number}`), `spec.endpointPickerRef` (`name`, `port.number`, `failureMode`);
- `inference.networking.x-k8s.io/v1alpha2`: `spec.selector` (the map itself),
  `spec.targetPortNumber`, `spec.extensionRef` (`name`, `portNumber`, `failureMode`).

The `kubernetes` client (the [k8s] extra) is synchronous: each call runs in a worker thread, and a
cancelled watch shuts its HTTP response down so that the thread returns at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

from balancer.config import InferencePoolConfig, ReplicaSpec
from balancer.health import replica_at
from balancer.membership import Membership

log = logging.getLogger(__name__)

# (group, version), newest first: the first one that has the pool is used.
API_VERSIONS = (("inference.networking.k8s.io", "v1"), ("inference.networking.x-k8s.io", "v1alpha2"))
PLURAL = "inferencepools"
# Container ports the chart names (deploy/helm/kvfleet): a pod's KV-event PUB and replay ports.
EVENTS_PORT_NAME = "kv-events"
REPLAY_PORT_NAME = "kv-replay"
EXTRA_HINT = "install the Kubernetes client: pip install 'kvfleet[k8s]'"
RBAC_HINT = ("grant this service account get, list and watch on pods and inferencepools in the pool's namespace "
             "(the chart's Role does)")


class PoolError(ValueError):
    """The pool's spec cannot be used (it says what is wrong)."""


class PoolTarget(NamedTuple):
    """What a pool selects: pods with all these labels, each port of each pod one replica
    (v1: "every port will be treated as a distinctive endpoint", `podIP:portNumber`)."""

    labels: tuple[tuple[str, str], ...]
    ports: tuple[int, ...]

    @property
    def label_selector(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.labels)


def pool_target(pool: dict) -> PoolTarget:
    """The selector and port of an InferencePool object (v1 or v1alpha2, as a dict)."""
    spec = pool.get("spec")
    if not isinstance(spec, dict):
        raise PoolError("the InferencePool has no spec")
    selector = spec.get("selector")
    if isinstance(selector, dict) and "matchLabels" in selector:  # v1: a LabelSelector
        selector = selector["matchLabels"]
    if not isinstance(selector, dict) or not selector or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in selector.items()):
        raise PoolError("the InferencePool's spec.selector (v1: spec.selector.matchLabels) must be a non-empty map of "
                        "labels: without one it would select every pod in the namespace")
    listed = spec.get("targetPorts")
    if isinstance(listed, list) and listed:  # v1
        ports = [p.get("number") if isinstance(p, dict) else None for p in listed]
    else:  # v1alpha2
        ports = [spec.get("targetPortNumber")]
    if not all(isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536 for p in ports):
        raise PoolError("the InferencePool names no port in [1, 65535]: spec.targetPorts[].number (v1) or "
                        "spec.targetPortNumber (v1alpha2)")
    return PoolTarget(tuple(sorted(selector.items())), tuple(ports))


def _named_port(pod: dict, name: str) -> int | None:
    for c in (pod.get("spec") or {}).get("containers") or ():
        for p in c.get("ports") or ():
            if p.get("name") == name and isinstance(p.get("containerPort"), int):
                return p["containerPort"]
    return None


def pod_replicas(pod: dict, ports: tuple[int, ...], events_port: int | None = None,
                 replay_port: int | None = None) -> list[ReplicaSpec]:
    """The replicas pod `pod` serves, one per port (KV events only with the first: a pod has one
    publisher); none while it may not take requests."""
    first = pod_replica(pod, ports[0], events_port, replay_port)
    if first is None:
        return []
    return [first, *(pod_replica(pod, p, -1, -1) for p in ports[1:])]


def pod_replica(pod: dict, port: int, events_port: int | None = None,
                replay_port: int | None = None) -> ReplicaSpec | None:
    """The replica pod `pod` is, or None while it may not take requests: not Ready, no IP yet,
    or being deleted (a terminating pod drains; the gateway stops sending to it too).
    `events_port` -1: none (not even a named port)."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    ip = status.get("podIP")
    if meta.get("deletionTimestamp") or not ip or status.get("phase") != "Running":
        return None
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or ())
    if not ready:
        return None
    def port_of(given: int | None, name: str) -> int | None:
        return None if given == -1 else given or _named_port(pod, name)

    return replica_at(ip, port, port_of(events_port, EVENTS_PORT_NAME), port_of(replay_port, REPLAY_PORT_NAME))


class _Gone(Exception):
    """The watch's resourceVersion is too old (410): list again."""


def api_client(cfg: InferencePoolConfig) -> Any:
    """A `kubernetes.client.ApiClient` from cfg's kubeconfig, else the pod's service account,
    else $KUBECONFIG or ~/.kube/config. Its own Configuration: no process-wide default is set."""
    try:
        from kubernetes import client, config
    except ImportError as e:
        raise RuntimeError(f"{e}; {EXTRA_HINT}") from None
    conf = client.Configuration()
    try:
        if cfg.kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=conf)
        else:
            if cfg.kubeconfig is not None and not os.path.isfile(cfg.kubeconfig):
                raise config.ConfigException(f"no such file: {cfg.kubeconfig}")
            config.load_kube_config(config_file=cfg.kubeconfig, context=cfg.context, client_configuration=conf,
                                    persist_config=False)
    except Exception as e:  # ConfigException, a YAML error, a file that cannot be read, ...
        if cfg.kubeconfig:
            where = f"the kubeconfig {cfg.kubeconfig}"
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            where = "the pod's service account (KUBERNETES_SERVICE_HOST is set; is a token mounted?)"
        else:
            where = ("Kubernetes credentials (not in a pod: KUBERNETES_SERVICE_HOST is unset; and no usable kubeconfig "
                     f"at {os.environ.get('KUBECONFIG') or '~/.kube/config'})")
        raise RuntimeError(f"cannot load {where}: {e}; pass --kubeconfig PATH to a working kubeconfig "
                           "(`kubectl config view` shows yours), or run inside a pod with a service account") from None
    conf.retries = 1  # fail fast: the watcher retries on its own schedule
    return client.ApiClient(conf)


class InferencePoolWatcher:
    def __init__(self, cfg: InferencePoolConfig, membership: Membership,
                 client_factory: Callable[[InferencePoolConfig], Any] = api_client) -> None:
        self.cfg = cfg
        self.membership = membership
        self.client_factory = client_factory
        self.api_version: tuple[str, str] | None = None  # (group, version) the pool was found under
        self.target: PoolTarget | None = None
        self._api: Any = None
        self._pods: dict[str, list[ReplicaSpec]] = {}  # pod name -> its replicas (none while not Ready)
        self._rv: str | None = None  # resourceVersion to watch from
        self._resp: Any = None  # the watch response in flight (shut down on cancel)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cancelled = threading.Event()
        self._following = False

    # ------------------------------------------------------------------ the API, in a thread
    async def _call(self, fn: Callable[[], Any]) -> Any:
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(None, fn)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            self._cancelled.set()  # a watch that starts after this returns at once (see _watch_pods)
            resp = self._resp
            if resp is not None:
                with contextlib.suppress(Exception):
                    resp.shutdown()  # unblocks a read in the thread (urllib3 >= 2.3)
            with contextlib.suppress(BaseException):
                await fut
            raise

    def _get_pool(self) -> tuple[tuple[str, str], dict]:
        from kubernetes import client

        api = client.CustomObjectsApi(self._api)
        for group, version in API_VERSIONS:
            try:
                resp = api.get_namespaced_custom_object(group, version, self.cfg.namespace, PLURAL, self.cfg.name,
                                                        _preload_content=False, _request_timeout=10)
            except client.ApiException as e:
                if e.status == 404:
                    continue
                raise
            return (group, version), json.loads(resp.data)
        versions = " and ".join(f"{g}/{v}" for g, v in API_VERSIONS)
        raise PoolError(f"InferencePool {self.cfg.ref} not found (looked under {versions}): create it (the chart's "
                        f"inferencePool.create=true does; `kubectl get inferencepools -n {self.cfg.namespace}` lists "
                        "them) or fix --inference-pool NAMESPACE/NAME")

    def _list_pods(self, target: PoolTarget) -> tuple[dict[str, list[ReplicaSpec]], str]:
        from kubernetes import client

        resp = client.CoreV1Api(self._api).list_namespaced_pod(
            self.cfg.namespace, label_selector=target.label_selector, _preload_content=False, _request_timeout=30)
        body = json.loads(resp.data)
        pods = {p["metadata"]["name"]: self._replica(p, target) for p in body.get("items") or ()}
        return pods, body["metadata"]["resourceVersion"]

    def _watch_pods(self, target: PoolTarget, rv: str, on_event: Callable[[str, dict], None]) -> None:
        """Watch the pods from `rv` for `resync_s` (server side), calling on_event per event."""
        from kubernetes import client
        from kubernetes.watch.watch import iter_resp_lines

        timeout = max(1, int(self.cfg.resync_s))
        resp = client.CoreV1Api(self._api).list_namespaced_pod(
            self.cfg.namespace, label_selector=target.label_selector, watch=True, resource_version=rv,
            allow_watch_bookmarks=True, timeout_seconds=timeout, _preload_content=False,
            _request_timeout=(10, timeout + 30))
        self._resp = resp
        try:
            if self._cancelled.is_set():  # cancelled before _resp was set: no one will shut it down
                return
            for line in iter_resp_lines(resp):
                if line:
                    ev = json.loads(line)
                    on_event(ev.get("type", ""), ev.get("object") or {})
        finally:
            self._resp = None
            resp.close()  # not back to the pool: the stream may have been left mid-way
            resp.release_conn()

    def _replica(self, pod: dict, target: PoolTarget) -> list[ReplicaSpec]:
        return pod_replicas(pod, target.ports, self.cfg.events_port, self.cfg.replay_port)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> list[ReplicaSpec]:
        """Read the pool and list its pods: the replicas now (not yet added to the registry).
        Raises RuntimeError saying what to do when the pool cannot be read."""
        try:
            self._api = await self._call(lambda: self.client_factory(self.cfg))
            await self._refresh()
        except RuntimeError:
            raise
        except PoolError as e:
            raise RuntimeError(f"inference pool {self.cfg.ref}: {e}") from None
        except Exception as e:  # the client's ApiException, urllib3's errors, ...
            raise RuntimeError(f"inference pool {self.cfg.ref}: {_explain(e, self.cfg)}") from None
        return self.replicas()

    def replicas(self) -> list[ReplicaSpec]:
        return sorted((s for specs in self._pods.values() for s in specs), key=lambda s: s.replica_id)

    async def _refresh(self) -> None:
        """Read the pool; list its pods again when it is new or its selector or port changed."""
        self.api_version, pool = await self._call(self._get_pool)
        target = pool_target(pool)
        if target != self.target or self._rv is None:
            self._pods, self._rv = await self._call(lambda: self._list_pods(target))
            if self.target is not None and target != self.target:
                log.info("inference pool %s now selects %s on ports %s", self.cfg.ref, target.label_selector,
                         target.ports)
            self.target = target

    def _on_event(self, kind: str, obj: dict) -> None:
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _Gone()
            raise RuntimeError(f"watch error from the API server: {obj.get('message') or obj}")
        meta = obj.get("metadata") or {}
        if meta.get("resourceVersion"):
            self._rv = meta["resourceVersion"]
        if kind == "BOOKMARK":
            return
        name = meta.get("name")
        if kind == "DELETED":
            self._pods.pop(name, None)
        elif kind in ("ADDED", "MODIFIED"):
            self._pods[name] = self._replica(obj, self.target)

    async def run(self) -> None:
        """Follow the pool until cancelled (start() first)."""
        self._loop = asyncio.get_running_loop()
        self._following = True
        self.membership.reconcile(self.replicas())
        try:
            await self._follow()
        finally:
            self._following = False

    async def _follow(self) -> None:
        while True:
            try:
                try:
                    await self._call(lambda: self._watch_pods(self.target, self._rv, self._on_event_applied))
                except _Gone:
                    self._rv = None  # compacted: list again
                await self._refresh()
                self.membership.reconcile(self.replicas())
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("inference pool %s: %s (keeping the current replicas; retrying in %.0f s)",
                            self.cfg.ref, _explain(e, self.cfg), self.cfg.resync_s)
                await asyncio.sleep(self.cfg.resync_s)
                self._rv = None  # list again: events may have been missed

    def _on_event_applied(self, kind: str, obj: dict) -> None:
        """An event, from the watch's thread: applied to the pods, then to the registry on the loop."""
        self._on_event(kind, obj)
        if kind != "BOOKMARK":
            self._loop.call_soon_threadsafe(self._apply, self.replicas())

    def _apply(self, specs: list[ReplicaSpec]) -> None:
        if self._following:  # not after the task was cancelled: the balancer may be stopping
            self.membership.reconcile(specs)

    async def close(self) -> None:
        if self._api is not None:
            api, self._api = self._api, None
            await asyncio.get_running_loop().run_in_executor(None, api.close)


def _explain(e: BaseException, cfg: InferencePoolConfig) -> str:
    """What went wrong talking to the API server, and what to do about it."""
    status = getattr(e, "status", None)
    if status in (401, 403):
        return (f"the Kubernetes API refused the request ({status} {getattr(e, 'reason', '')}): {RBAC_HINT}; "
                "a kubeconfig's credentials may also have expired")
    if isinstance(status, int) and status:
        return f"the Kubernetes API answered {status} {getattr(e, 'reason', '')}: {getattr(e, 'body', '') or e}"
    if isinstance(e, PoolError):
        return str(e)
    return (f"cannot reach the Kubernetes API server ({type(e).__name__}: {e}); check the kubeconfig's server "
            "(`kubectl cluster-info`) or the pod's network")

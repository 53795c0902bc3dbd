"""The comparison's tools, found or installed: wrk and nginx (Debian packages, `apt-get install`
as root) and sglang-router (PyPI, into its own venv under ~/.cache/kvfleet-bench, never into the
project's). Nothing is installed with --no-install; a tool that cannot be had gets "n/a (reason)"
rows."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

SGLANG_VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvfleet-bench" / "sglang-venv"


def _sh(cmd: list[str], timeout: float) -> tuple[int, str]:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return r.returncode, (r.stdout + r.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return 1, str(e)


def ensure_debian_tools(install: bool) -> dict[str, str | None]:
    """Paths of wrk and nginx, installing them with apt-get when missing and allowed."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    have = {"wrk": shutil.which("wrk"), "nginx": nginx}
    missing = [k for k, v in have.items() if v is None]
    if missing and install and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"installing {' '.join(missing)} with apt-get ...", flush=True)
        _sh(["apt-get", "update", "-qq"], 180)
        rc, out = _sh(["apt-get", "install", "-y", "-qq", *missing], 240)
        if rc != 0:
            print(f"apt-get install failed: {out[-300:]}", flush=True)
        have = {"wrk": shutil.which("wrk"),
                "nginx": shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)}
    return have


def ensure_sglang_router(install: bool) -> tuple[str | None, str]:
    """(python of a venv with sglang_router, version) or (None, reason)."""
    py = SGLANG_VENV / "bin" / "python"
    probe = ["-c", "import importlib.metadata as m; print(m.version('sglang-router'))"]
    if py.exists():
        rc, out = _sh([str(py), *probe], 60)
        if rc == 0:
            return str(py), out.splitlines()[-1]
    if not install:
        return None, "not installed (--no-install)"
    print(f"installing sglang-router into {SGLANG_VENV} ...", flush=True)
    rc, out = _sh([sys.executable, "-m", "venv", "--clear", str(SGLANG_VENV)], 120)
    if rc != 0:
        return None, f"venv failed: {out[-200:]}"
    rc, out = _sh([str(py), "-m", "pip", "install", "-q", "sglang-router"], 400)
    if rc != 0:
        last = [line for line in out.splitlines() if "ERROR" in line] or out.splitlines()[-1:]
        return None, f"pip install failed: {last[-1][:150] if last else rc}"
    rc, out = _sh([str(py), *probe], 60)
    return (str(py), out.splitlines()[-1]) if rc == 0 else (None, f"import failed: {out[-150:]}")


NGINX_CONF = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    client_max_body_size 16m;
    keepalive_requests 1000000;
    upstream backend {{
        server {backend};
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


def nginx_version(nginx: str) -> str:
    _, ver = _sh([nginx, "-v"], 10)
    return ver.replace("nginx version: ", "")

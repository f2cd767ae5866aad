"""LiteLLM's proxy as a benchmark's peer: in a virtual environment of its own (it is never a
dependency of the project), routing one model name to an Anthropic endpoint, on loopback.

The route is the proxy's ``POST /v1/messages`` (``litellm/proxy/anthropic_endpoints/
endpoints.py``): it takes an Anthropic Messages body, picks the deployment of its ``model`` from
the config's ``model_list`` through LiteLLM's router, and for an ``anthropic/`` deployment calls
``litellm.anthropic_messages``, which sends the body on in Anthropic's own format (no
translation to OpenAI's) and streams the answer's events back. Its callers' auth is the config's
master key; there is no database (so no virtual keys, spend or error logs).

Configured as LiteLLM's production notes say (docs.litellm.ai/docs/proxy/prod): they run one
Uvicorn worker (on uvloop) per instance and add instances to scale, which on one machine is a
worker per core (``--num_workers``; the CLI's default is 1); ``LITELLM_LOG=ERROR`` (no access
log), ``LITELLM_MODE=PRODUCTION`` (no ``.env``), ``set_verbose: false``. Nothing it
does reaches past loopback: telemetry vetoed (``LITELLM_TELEMETRY_DISABLED``), and the model
cost map, beta headers, blog posts, policy templates and router presets read from the
package's own copies (``LITELLM_LOCAL_*``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from hyperfleet.processes import spawn, stop, tail, wait_http_ok

VERSION = "1.108.7"
VENV = Path.home() / ".cache" / "hyperfleet-bench" / "litellm-venv"
ROUTE = "/v1/messages"
INSTALL_TIMEOUT_S = 1200.0
PROBE_TIMEOUT_S = 60.0
READY_TIMEOUT_S = 300.0  # its import alone takes a minute on a busy 2-core machine
STOP_GRACE_S = 10.0
OFFLINE_ENV = {
    "LITELLM_TELEMETRY_DISABLED": "true",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
    "LITELLM_LOCAL_BLOG_POSTS": "True",
    "LITELLM_LOCAL_POLICY_TEMPLATES": "True",
    "LITELLM_LOCAL_AUTOROUTER_PRESETS": "True",
    "LITELLM_LOG": "ERROR",
    "LITELLM_MODE": "PRODUCTION",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}
# Variables that would give the proxy a database, a Redis or another upstream.
UNSET = ("DATABASE_URL", "REDIS_URL", "REDIS_HOST", "ANTHROPIC_API_KEY", "ANTHROPIC_API_BASE")


def installed_version(venv: Path = VENV) -> str | None:
    """The LiteLLM version in ``venv``; None when it has none."""
    python = venv / "bin" / "python"
    if not python.exists():
        return None
    done = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
        timeout=PROBE_TIMEOUT_S,
        check=False,
    )
    return done.stdout.strip() or None if done.returncode == 0 else None


def ensure_installed(version: str = VERSION, venv: Path = VENV) -> str:
    """``litellm[proxy]==version`` in ``venv``, installed there (from PyPI) when missing; the
    version it holds.

    Raises:
        RuntimeError: the virtual environment or the install failed.
    """
    if installed_version(venv) == version:
        return version
    steps = []
    if not (venv / "bin" / "python").exists():
        steps.append([sys.executable, "-m", "venv", str(venv)])
    steps.append(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"litellm[proxy]=={version}"]
    )
    for argv in steps:
        print(f"installing LiteLLM: {' '.join(argv)}", file=sys.stderr, flush=True)
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr[-2000:]}")
    found = installed_version(venv)
    if found != version:
        raise RuntimeError(f"asked pip for litellm {version}, {venv} holds {found}")
    return found


def config(model: str, upstream_url: str, upstream_key: str, master_key: str) -> str:
    """The proxy's config: ``model`` routed to an Anthropic endpoint. JSON, which is YAML."""
    return json.dumps(
        {
            "model_list": [
                {
                    "model_name": model,
                    "litellm_params": {
                        "model": f"anthropic/{model}",
                        "api_base": upstream_url,
                        "api_key": upstream_key,
                    },
                }
            ],
            "litellm_settings": {"set_verbose": False, "telemetry": False},
            "general_settings": {
                "master_key": master_key,
                "disable_spend_logs": True,
                "disable_error_logs": True,
            },
        },
        indent=1,
    )


def master_key() -> str:
    return "sk-bench-" + secrets.token_urlsafe(16)


@contextlib.contextmanager
def proxy(
    config_path: Path, port: int, workers: int, log: Path, venv: Path = VENV
) -> Iterator[subprocess.Popen[bytes]]:
    """The proxy on 127.0.0.1:``port``, ready, and stopped with its workers on the way out.

    Raises:
        RuntimeError: it did not answer its liveness probe in ``READY_TIMEOUT_S``.
    """
    env = {**os.environ, **OFFLINE_ENV}
    for name in UNSET:
        env.pop(name, None)
    argv = [
        str(venv / "bin" / "litellm"),
        f"--config={config_path}",
        "--host=127.0.0.1",
        f"--port={port}",
        f"--num_workers={workers}",
    ]
    process = spawn(argv, env=env, log=log)
    try:
        if not wait_http_ok(f"http://127.0.0.1:{port}/health/liveliness", READY_TIMEOUT_S):
            raise RuntimeError(f"LiteLLM's proxy did not start; its log:\n{tail(log)}")
        yield process
    finally:
        stop(process, STOP_GRACE_S)

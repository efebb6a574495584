"""What several end-to-end tests do to a running mesh: wait for a condition, read its Redis
records, call the router's admin API."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import redis

from services.launch import Mesh


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def records(mesh: Mesh, kind: str) -> list[dict[str, str]]:
    """Every `group` or `slot` hash the mesh's services keep in Redis."""
    r = redis.Redis.from_url(mesh.redis_url, decode_responses=True)
    try:
        return [raw for key in r.scan_iter(f"{mesh.config.redis_prefix}{kind}:*") if (raw := r.hgetall(key))]
    finally:
        r.close()


def admin(mesh: Mesh, method: str, path: str, body: dict[str, Any] | None = None,
          key: str | None = None) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) of one admin API call; `key`: another bearer key than the mesh's."""
    req = urllib.request.Request(f"{mesh.admin_url}{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {mesh.admin_key if key is None else key}"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())

"""What tests/e2e/test_multihost.py asks of the mesh from inside its gateway's network namespace
(the test process cannot reach that network): `python -m tests.e2e.netns_client VERB ...` prints
one JSON line and exits 0, or prints why it could not and exits 1.

  health URL TIMEOUT_S                 wait until URL/health answers 200
  complete URL PROMPT_IDS MAX_TOKENS   one greedy completion with the `openai` client (streamed
                                       and not): {"text", "streamed"}
  admin URL KEY METHOD PATH [BODY]     one admin API call: {"status", "body"}
  slots REDIS_URL                      each registered slot's `status` verb, by index
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any


def health(url: str, timeout_s: float) -> dict[str, Any]:
    deadline, last = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return {"ok": True}
        except urllib.error.HTTPError as e:
            last = f"{e.code}: {e.read()[:300]!r}"
        except OSError as e:
            last = repr(e)
        time.sleep(0.2)
    raise SystemExit(f"{url}/health not ready after {timeout_s:g}s (last: {last})")


def complete(url: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-multihost", max_retries=0, timeout=60)
    args: dict[str, Any] = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                            "extra_body": {"ignore_eos": True}}
    text = client.completions.create(**args).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(**args, stream=True) if c.choices)
    return {"text": text, "streamed": streamed}


def admin(url: str, key: str, method: str, path: str, body: str | None = None) -> dict[str, Any]:
    req = urllib.request.Request(f"{url}{path}", method=method, data=None if body is None else body.encode(),
                                 headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return {"status": r.status, "body": json.loads(r.read())}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "body": json.loads(e.read())}


def slots(redis_url: str) -> dict[str, Any]:
    import grpc
    import redis

    from services.rpc import pb, pb_grpc

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    out = {}
    for key in client.scan_iter("nitsum:slot:*"):
        with grpc.insecure_channel(client.hget(key, "address") or "") as channel:
            reply = pb_grpc.SlotControlStub(channel).Command(pb.SlotCommand(status=pb.StatusCommand()), timeout=10)
        s = reply.status
        group = {"tp": s.group.tp, "rank": s.group.rank, "role": s.group.role} if s.HasField("group") else None
        out[str(s.index)] = {"index": s.index, "address": s.address, "group": group, "kv_backend": s.kv_backend}
    client.close()
    return out


def main(argv: list[str]) -> int:
    verb, args = argv[0], argv[1:]
    if verb == "health":
        out = health(args[0], float(args[1]))
    elif verb == "complete":
        out = complete(args[0], json.loads(args[1]), int(args[2]))
    elif verb == "admin":
        out = admin(*args)
    elif verb == "slots":
        out = slots(args[0])
    else:
        raise SystemExit(f"unknown verb {verb!r}: health, complete, admin or slots")
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

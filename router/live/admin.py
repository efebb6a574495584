"""The router's admin API (served with --admin-port; every call needs the admin key).

  GET  /admin/plan             the plan, its epoch, the groups serving and what each slot holds
  POST /admin/plan             apply a plan: {"plan": "p2,d2"} or the JSON form
                               ({"groups": [{"role": "prefill", "slots": [0, 1]}, ...]});
                               answers the reconfiguration's report
  GET  /admin/reconfigurations the last reports, oldest first
  GET  /metrics                the router's Prometheus metrics (no key needed)

The key goes in `Authorization: Bearer KEY`. Errors use OpenAI's shape: {"error": {"message",
"type", "param", "code"}}. A plan this cluster cannot take is a 400 and changes nothing; a
reconfiguration that had to fall back to another plan is a 409 carrying the report; one that
failed outright is a 500.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from router.reconfig.orchestrator import Orchestrator, PlanError, parse_plan_input
from services.metrics import CONTENT_TYPE, RouterMetrics, generate_latest


def _error(status: int, message: str, kind: str, code: str, extra: dict[str, Any] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    body.update(extra or {})
    return JSONResponse(body, status_code=status)


def build_app(orchestrator: Orchestrator, metrics: RouterMetrics, admin_key: str,
              is_leading: Any = lambda: True) -> FastAPI:
    app = FastAPI(title="nitsum router admin", docs_url=None, redoc_url=None, openapi_url=None)

    def denied(request: Request) -> JSONResponse | None:
        if not admin_key:
            return _error(403, "the admin API is off: start the router with --admin-key (or NITSUM_ADMIN_KEY)",
                          "permission_error", "admin_disabled")
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not given:
            return _error(401, "missing admin key: send 'Authorization: Bearer <admin key>'",
                          "authentication_error", "missing_admin_key")
        if not hmac.compare_digest(given.encode(), admin_key.encode()):
            return _error(401, "wrong admin key", "authentication_error", "invalid_admin_key")
        if not is_leading():
            return _error(409, "this router is not the leader; send admin calls to the leading router",
                          "conflict_error", "not_leader")
        return None

    @app.get("/admin/plan")
    async def show(request: Request) -> Response:
        if (bad := denied(request)) is not None:
            return bad
        return JSONResponse(await orchestrator.show())

    @app.post("/admin/plan")
    async def apply(request: Request) -> Response:
        if (bad := denied(request)) is not None:
            return bad
        return await _apply(orchestrator, await request.body())

    @app.get("/admin/reconfigurations")
    async def history(request: Request) -> Response:
        if (bad := denied(request)) is not None:
            return bad
        return JSONResponse({"reconfigurations": [r.to_dict() for r in orchestrator.history]})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE)

    return app


async def _apply(orchestrator: Orchestrator, raw: bytes) -> Response:
    """POST /admin/plan: 400 for a plan this cluster cannot take (nothing changes), the report once
    applied, 409 with the report when it fell back to another plan, 500 when it failed outright."""
    try:
        doc = json.loads(raw or b"null")
    except json.JSONDecodeError as e:
        return _error(400, f"body is not JSON: {e}", "invalid_request_error", "invalid_json")
    if isinstance(doc, dict) and isinstance(doc.get("plan"), str):
        text = doc["plan"]
    elif isinstance(doc, dict) and "groups" in doc:
        text = json.dumps(doc)
    else:
        return _error(400, 'send {"plan": "p2,d2"} or a plan object {"groups": [{"role": ..., "slots": [...]}]}',
                      "invalid_request_error", "invalid_plan")
    try:
        plan = parse_plan_input(text, None)
        report = await orchestrator.apply(plan)
    except (PlanError, ValueError) as e:
        return _error(400, str(e), "invalid_request_error", "invalid_plan")
    body = report.to_dict()
    if report.result in ("committed", "unchanged"):
        return JSONResponse(body)
    if report.result == "failed":
        return _error(500, f"the reconfiguration failed: {report.error}", "server_error", "reconfig_failed",
                      {"report": body})
    return _error(409, f"the plan could not be applied as asked ({report.error}); the cluster runs "
                  f"{report.plan} instead ({report.result})", "conflict_error", report.result, {"report": body})

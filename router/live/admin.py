"""The router's admin API (served with --admin-port; every call needs the admin key).

  GET  /admin/plan             the plan, its epoch, the groups serving and what each slot holds
  POST /admin/plan             apply a plan: {"plan": "p2,d2"} or the JSON form
                               ({"groups": [{"role": "prefill", "slots": [0, 1]}, ...]});
                               answers the reconfiguration's report
  GET  /admin/reconfigurations the last reports, oldest first
  GET  /admin/autopilot        the plan loop's settings, state and last decision (with its explanation);
                               ?explain=1 adds the live estimate and the best candidates' predicted goodput
  POST /admin/autopilot        {"enabled": true|false, "interval_s": 5, "pin": "p1,d1", "unpin": true}
                               (any subset; a pinned plan is applied and held until unpinned)
  GET  /admin/decisions        the plan loop's last decisions, oldest first (?limit=N, default 100)
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
from services.cluster import journal
from services.metrics import CONTENT_TYPE, RouterMetrics, generate_latest


def _error(status: int, message: str, kind: str, code: str, extra: dict[str, Any] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    body.update(extra or {})
    return JSONResponse(body, status_code=status)


def build_app(orchestrator: Orchestrator, metrics: RouterMetrics, admin_key: str,
              is_leading: Any = lambda: True, autopilot: Any = None) -> FastAPI:
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

    _autopilot_routes(app, denied, orchestrator, autopilot)

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


def _autopilot_routes(app: FastAPI, denied: Any, orchestrator: Orchestrator, autopilot: Any) -> None:
    """GET/POST /admin/autopilot and GET /admin/decisions (router/live/autopilot.py)."""
    @app.get("/admin/autopilot")
    async def pilot_status(request: Request) -> Response:
        if (bad := denied(request)) is not None:
            return bad
        if autopilot is None:
            return _no_autopilot()
        return JSONResponse(autopilot.explain() if request.query_params.get("explain") else autopilot.status())

    @app.post("/admin/autopilot")
    async def pilot_control(request: Request) -> Response:
        if (bad := denied(request)) is not None:
            return bad
        if autopilot is None:
            return _no_autopilot()
        return _control(autopilot, await request.body())

    @app.get("/admin/decisions")
    async def decisions(request: Request, limit: int = 100) -> Response:
        if (bad := denied(request)) is not None:
            return bad
        if not 1 <= limit <= 500:
            return _error(400, f"limit {limit}: give 1 to 500", "invalid_request_error", "invalid_limit")
        return JSONResponse({"decisions": await journal.decisions(orchestrator.cluster, limit)})


def _no_autopilot() -> JSONResponse:
    return _error(404, "this router runs no autopilot (started with --no-orchestrate)", "not_found_error",
                  "no_autopilot")


_CONTROL_KEYS: dict[str, type | tuple[type, ...]] = {"enabled": bool, "interval_s": (int, float), "pin": str,
                                                   "unpin": bool}


def _control(autopilot: Any, raw: bytes) -> Response:
    """POST /admin/autopilot: a 400 naming the field for anything malformed; nothing changes then."""
    try:
        doc = json.loads(raw or b"null")
    except json.JSONDecodeError as e:
        return _error(400, f"body is not JSON: {e}", "invalid_request_error", "invalid_json")
    if not isinstance(doc, dict) or not doc:
        return _error(400, 'send a JSON object with any of "enabled", "interval_s", "pin", "unpin"',
                      "invalid_request_error", "invalid_body")
    for key, value in doc.items():
        kind = _CONTROL_KEYS.get(key)
        if kind is None:
            return _error(400, f"unknown field {key!r}; use enabled, interval_s, pin, unpin", "invalid_request_error",
                          "unknown_field")
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            return _error(400, f"{key} has the wrong type ({type(value).__name__})", "invalid_request_error",
                          "invalid_type")
    try:
        return JSONResponse(autopilot.control(doc.get("enabled"), doc.get("interval_s"), doc.get("pin"),
                                              bool(doc.get("unpin", False))))
    except ValueError as e:
        return _error(400, str(e), "invalid_request_error", "invalid_value")

"""Which tier a request runs in: API key -> allowed tiers, then `X-Nitsum-Tier`, then `service_tier`.

The key is checked (`authenticate`, headers only) before the body is read, so a client without a
valid key costs no parsing; the tier is chosen (`choose_tier`) once the body says its `service_tier`.
"""

from __future__ import annotations

from services.config import ApiKeyPolicy, TierPolicy

from .errors import bad_request, forbidden, unauthorized


def bearer_key(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def authenticate(policy: TierPolicy, authorization: str | None) -> ApiKeyPolicy | None:
    """The key's grant, None when no keys are configured (every tier is open, any key accepted),
    or 401 for a missing or unknown key."""
    if not policy.api_keys:
        return None
    key = bearer_key(authorization)
    if key is None:
        raise unauthorized("this server needs an API key: send 'Authorization: Bearer <key>'")
    grant = policy.grant_for(key)
    if grant is None:
        raise unauthorized("the API key is not known to this server")
    return grant


def choose_tier(policy: TierPolicy, grant: ApiKeyPolicy | None, tier_header: str | None,
                service_tier: str | None) -> str:
    """The tier to serve in, or an ApiError: 400 unknown tier, 403 tier not allowed.

    The header wins over the body's `service_tier`; with neither, the key's default tier (or the
    policy's) is used.
    """
    allowed: tuple[str, ...] = policy.names
    default = policy.default_tier
    if grant is not None:
        allowed = grant.tiers
        default = grant.default_tier or (policy.default_tier if policy.default_tier in allowed else allowed[0])
    if tier_header is not None:
        name = tier_header.strip()
        if name not in policy.names:
            raise bad_request(f"unknown tier {name!r} in X-Nitsum-Tier; tiers are {', '.join(policy.names)}",
                              "X-Nitsum-Tier", "unknown_tier")
    elif service_tier is not None:
        if service_tier not in policy.service_tiers:
            choices = ", ".join(sorted(policy.service_tiers))
            raise bad_request(f"unknown service_tier {service_tier[:200]!r}; use one of {choices}",
                              "service_tier", "unknown_tier")
        name = policy.service_tiers[service_tier]
    else:
        name = default
    if name not in allowed:
        raise forbidden(f"this API key may not use tier {name!r}; it may use {', '.join(allowed)}")
    return name


def resolve_tier(policy: TierPolicy, authorization: str | None, tier_header: str | None,
                 service_tier: str | None) -> str:
    """`authenticate` then `choose_tier`: 401 unknown key, 400 unknown tier, 403 tier not allowed."""
    return choose_tier(policy, authenticate(policy, authorization), tier_header, service_tier)

"""`nitsum gateway`: the HTTP front door as its own process."""

from __future__ import annotations

import argparse
from pathlib import Path

from pydantic import ValidationError

from services.cliutil import explain, fail, setup_logging
from services.config import GatewayConfig, RedisSettings, TierPolicy


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder (its tokenizer and chat template are used)")
    p.add_argument("--model-name", default="", help="model id shown by /v1/models (default: the folder name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--redis-prefix", default="nitsum:")
    p.add_argument("--tiers", default=None, help="tiers file (JSON or .toml): tiers, API keys, service_tier map")
    p.add_argument("--role-grace-s", type=float, default=15.0,
                   help="requests wait (instead of 503) while a prefill/decode group or router that served "
                        "this recently is being replaced (default 15)")
    p.add_argument("--router-grace-s", type=float, default=10.0,
                   help="a waiting request fails with 503 once no router has led, or Redis has been "
                        "unreachable, this long (default 10)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("gateway", help="run the OpenAI-compatible HTTP gateway")
    add_arguments(p)
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> GatewayConfig:
    return GatewayConfig(host=args.host, port=args.port, model=Path(args.model), model_name=args.model_name,
                         redis=RedisSettings(url=args.redis_url, prefix=args.redis_prefix),
                         policy=TierPolicy.load(args.tiers), role_grace_s=args.role_grace_s,
                         router_grace_s=args.router_grace_s)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app
    from .codec import load_codec

    setup_logging()
    try:
        config = build_config(args)
        codec = load_codec(config.model)
    except ValidationError as e:
        return fail("gateway", explain(e))
    except (ValueError, OSError) as e:
        return fail("gateway", str(e))
    uvicorn.run(create_app(config, codec), host=config.host, port=config.port, log_level="warning",
                timeout_graceful_shutdown=3)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nitsum gateway")
    add_arguments(parser)
    return run(parser.parse_args(argv))

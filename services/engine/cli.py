"""`nitsum make-model` and `nitsum generate`: the engine on the command line."""

from __future__ import annotations

import argparse
import json
import sys

from services.engine.errors import BadRequestError, ModelLoadError


def register(sub: argparse._SubParsersAction) -> None:
    mk = sub.add_parser("make-model", help="write a random-weight checkpoint in Hugging Face format",
                        description="Write a random-weight checkpoint (config.json, safetensors, tokenizer, "
                                    "chat template) that transformers and nitsum load unchanged.")
    mk.add_argument("--preset", choices=["tiny", "small"], default="tiny",
                    help="tiny: for tests (seconds); small: ~110M parameters, for benchmarks")
    mk.add_argument("--out", required=True, help="folder to write (created if missing)")
    mk.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--arch", choices=["llama", "qwen2", "mistral"], default="llama",
                    help="architecture written to config.json (qwen2 adds QKV bias)")
    mk.add_argument("--shards", type=int, default=1, help="number of safetensors files (with an index if > 1)")
    mk.set_defaults(func=_make_model)

    gen = sub.add_parser("generate", help="generate from prompts with the engine (one continuous batch)",
                         description="Run prompts through the engine and print the completions.")
    gen.add_argument("--model", required=True, help="Hugging Face checkpoint folder")
    gen.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (1, 2, 4, 8)")
    gen.add_argument("--device", default="cpu", help="cpu or cuda")
    gen.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16, float16")
    gen.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable)")
    gen.add_argument("--prompt-ids", action="append", default=[], help="a prompt as comma-separated token ids (repeatable)")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    gen.set_defaults(func=_generate)


def _make_model(args: argparse.Namespace) -> int:
    from services.engine.make_model import make_model

    path = make_model(args.preset, args.out, args.dtype, args.seed, args.arch, args.shards)
    print(f"wrote {args.preset} {args.arch} checkpoint to {path}", file=sys.stderr)
    return 0


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BadRequestError(f"--prompt-ids {text!r}: expected comma-separated integers, e.g. 1,2,3") from None


def _generate(args: argparse.Namespace) -> int:
    from services.engine import EngineArgs, LLMEngine, SamplingParams

    if not args.prompt and not args.prompt_ids:
        raise BadRequestError("give at least one --prompt TEXT or --prompt-ids 1,2,3")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos)
    engine = LLMEngine(EngineArgs(model=args.model, tp=args.tp, device=args.device, dtype=args.dtype))
    try:
        prompts = [engine.tokenizer.encode(p) for p in args.prompt] + [_parse_ids(p) for p in args.prompt_ids]
        outputs = engine.generate(prompts, params)
    finally:
        engine.shutdown()
    for i, (prompt, ids) in enumerate(zip(prompts, outputs, strict=True)):
        text = engine.tokenizer.decode(ids)
        if args.json:
            print(json.dumps({"index": i, "prompt_token_ids": prompt, "token_ids": ids, "text": text}))
        else:
            print(text)
    return 0


USER_ERRORS = (BadRequestError, ModelLoadError, ValueError, FileNotFoundError)

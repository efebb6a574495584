"""`nitsum import-gguf FILE --out DIR`: a GGUF file as a Hugging Face checkpoint folder."""

from __future__ import annotations

import argparse
import sys
import time

from services.cliutil import fail


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-gguf", help="turn a llama-family GGUF file into a Hugging Face checkpoint folder",
                       description="Read a GGUF file (llama, mistral, SmolLM, qwen2; F32, F16, BF16, Q8_0, Q4_0, "
                                   "Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K tensors) and write a checkpoint folder that nitsum "
                                   "and transformers load unchanged: config.json, dequantized safetensors, "
                                   "tokenizer.json, tokenizer_config.json (with the chat template) and "
                                   "generation_config.json.")
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="the .gguf file")
    p.add_argument("--out", required=True, help="checkpoint folder to write (new or empty)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weight type written (default float32: the dequantized values exactly)")
    p.add_argument("--force", action="store_true", help="replace --out if it already holds a checkpoint")


def run(args: argparse.Namespace) -> int:
    from services.gguf.importer import import_gguf
    from services.gguf.reader import GGUFImportError

    started = time.monotonic()
    try:
        out = import_gguf(args.file, args.out, args.dtype, replace=args.force)
    except GGUFImportError as e:
        return fail("import-gguf", str(e))
    except OSError as e:
        return fail("import-gguf", f"{e.filename or args.out}: {e.strerror or e}")
    print(f"wrote {out} ({args.dtype}) in {time.monotonic() - started:.1f}s", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nitsum import-gguf")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

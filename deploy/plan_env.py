"""Write the per-slot settings of a plan into deploy/.env for docker-compose.yml.

    .venv/bin/python deploy/plan_env.py --plan p2,p2,d4 --gpus 8 --write deploy/.env

A plan (`p2,p2,d4`: two prefill groups of TP 2 and a decode group of TP 4, slots handed out in
order, the same text `nitsum up --plan` takes, with the same group ids) becomes, per slot k,
SLOTk_ROLE / _GROUP / _RANK / _TP / _DIST (the group leader's TCPStore) / _GPU, plus NITSUM_PLAN,
NITSUM_GPUS and COMPOSE_PROFILES=slotsN, which starts the compose services slot2..slot(N-1).
With --write, the block between the markers below is replaced (or appended); without, printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere in the checkout

from services.launch import plan_groups  # noqa: E402

MAX_SLOTS = 8  # slot services in docker-compose.yml
BEGIN = "# >>> plan (written by deploy/plan_env.py --plan P --gpus N; rerun it to change the plan)"
END = "# <<< plan"


def render(plan: str, gpus: int, gpu_ids: list[str] | None = None) -> str:
    """The .env block for `plan` on a host with `gpus` GPUs (slot k uses GPU gpu_ids[k])."""
    groups = plan_groups(plan, gpus)
    used = sum(g.tp for g in groups)
    if used > MAX_SLOTS:
        raise ValueError(f"plan {plan!r} uses {used} slots; docker-compose.yml has {MAX_SLOTS}")
    ids = gpu_ids or [str(k) for k in range(gpus)]
    if len(ids) < used:
        raise ValueError(f"plan {plan!r} uses {used} slots but only {len(ids)} GPU ids were given")
    lines = [BEGIN, f"NITSUM_PLAN={plan}", f"NITSUM_GPUS={gpus}", f"COMPOSE_PROFILES=slots{used}"]
    for g in groups:
        leader = g.slots[0]
        for rank, slot in enumerate(g.slots):
            lines += [f"SLOT{slot}_ROLE={g.role}", f"SLOT{slot}_GROUP={g.group_id}", f"SLOT{slot}_RANK={rank}",
                      f"SLOT{slot}_TP={g.tp}", f"SLOT{slot}_DIST=slot{leader}:29500", f"SLOT{slot}_GPU={ids[slot]}"]
    lines.append(END)
    return "\n".join(lines) + "\n"


def write(path: Path, block: str) -> None:
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END + "\n")
        text = head + block + tail
    else:
        text = text + ("" if not text or text.endswith("\n") else "\n") + block
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="plan_env.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", required=True, help="e.g. p2,p2,d4 (prefill/decode groups with their TP degree)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs on the host")
    p.add_argument("--gpu-ids", default=None, help="comma-separated GPU ids, slot 0 first (default 0,1,...)")
    p.add_argument("--write", default=None, help=".env file whose plan block to replace")
    args = p.parse_args(argv)
    try:
        block = render(args.plan, args.gpus, args.gpu_ids.split(",") if args.gpu_ids else None)
    except ValueError as e:
        print(f"plan_env.py: error: {e}", file=sys.stderr)
        return 2
    if args.write:
        write(Path(args.write), block)
    else:
        sys.stdout.write(block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

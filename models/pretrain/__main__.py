"""``python -m facemux.models.pretrain --job-dir DIR``: run or resume one job (torchrun-ready)."""

from __future__ import annotations

import argparse
import gc
import json

from .run import run_job


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m facemux.models.pretrain",
        description="Run or resume one training job from its work directory (torchrun-ready). "
        "To pretrain on a server's store, run facemux.service.training.standalone.",
    )
    p.add_argument(
        "--job-dir", required=True, help="work directory with spec.json and data/ (resumable)"
    )
    args = p.parse_args(argv)
    result = run_job(args.job_dir)
    print(json.dumps({k: v for k, v in result.items() if k != "summary"}, sort_keys=True))
    gc.freeze()  # torch's objects outlive the job: the collections at exit need not walk them
    return 0 if result.get("status") in ("succeeded", "paused", "cancelled") else 1


if __name__ == "__main__":
    raise SystemExit(main())

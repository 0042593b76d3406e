"""``python -m tunelab.cli.rank_worker CONFIG``: one extra DDP rank of a tunelab job.

Started by rank 0 (tunelab.engine.distributed.RankGroup) with LOCAL_RANK, MASTER_ADDR/PORT and
WORLD_SIZE set; trains from the job's resolved config file, never from ``sys.argv``.
"""

from __future__ import annotations

import logging
import sys

from omegaconf import OmegaConf


def main(argv: list[str] | None = None) -> int:
    from tunelab.cli.train import train
    from tunelab.engine.distributed import leave_process_group
    from tunelab.errors import TunelabError

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tunelab.cli.rank_worker RESOLVED_CONFIG.yaml", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = OmegaConf.load(args[0])
    try:
        train(cfg)
    except TunelabError as err:
        print(f"tunelab rank: error: {err}", file=sys.stderr)
        return 2
    finally:
        leave_process_group()
    print("tunelab rank: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

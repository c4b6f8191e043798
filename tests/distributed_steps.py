"""Helper for tests/test_distributed.py: train a few steps on fixed global batches and save
the state (rank 0). Run alone (one process) or under mpiexec (a data-parallel job).

    python tests/distributed_steps.py MODEL.dln TARGET OUT.npz [OPTIONS_JSON]

OPTIONS_JSON holds the session's options, and "pad": true to compile for the largest global
batch (each rank then compiles for its largest shard of it, and pads smaller shards to it);
every rank writes the batch sizes it compiled to OUT.rankR.json.
"""
import json
import sys

import numpy as np

import dlc
from dlc.runtime.distributed import world_from_env

# global batch sizes: uneven shards (7 = 4 + 3), a rank without a sample (1), a shard of 1
SIZES = (7, 7, 1, 3, 2, 7)


def batches(features: int):
    rng = np.random.default_rng(1)
    for n in SIZES:
        yield rng.normal(size=(n, features)).astype(np.float32), rng.integers(0, 10, n).astype(np.int32)


def main(src: str, target: str, out: str, options: str = "{}") -> None:
    world = world_from_env()
    m = dlc.load(src)
    options = json.loads(options)
    pad = options.pop("pad", False)
    session = m.session(m.train_config, target, world, **options)
    if pad:
        session.use_batch(max(SIZES))
    features = int(m.input_types[0][1].shape[1])
    results = [session.train_step(x, y, 0.05) for x, y in batches(features)]
    if world is None or world.lead:
        np.savez(out, **m.state, __losses__=np.array([r["loss"] for r in results]))
    rank = 0 if world is None else world.rank
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump(sorted(getattr(session.program, "units", {})), f)
    if world is not None:
        world.end(0)


if __name__ == "__main__":
    main(*sys.argv[1:])

"""Helper for tests/test_distributed.py: train generated models (a JSON list of [text, input
dtype, input shape, declared output shape, vocabulary]) a few steps each on fixed global
batches, and write each one's losses and state (rank 0), or the dlc error it raised. Run
alone (one process) or under mpiexec (a data-parallel job).

    python tests/distributed_generated.py MODELS.json TARGET OUT.json [pad]

`pad`: compile for the largest global batch (each rank pads its smaller shards).
"""
import json
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dlc  # noqa: E402
from dlc.runtime.distributed import world_from_env  # noqa: E402
from distributed_steps import SIZES  # noqa: E402
from test_fuzz import fuzz_labels  # noqa: E402


def main(models: str, target: str, out: str, pad: str = "") -> None:
    warnings.simplefilter("ignore")  # (a generated softmax before cross_entropy)
    world = world_from_env()
    results = {}
    for i, (text, dtype, in_shape, declared, vocab) in enumerate(json.loads(Path(models).read_text())):
        try:
            m = dlc.load(text)
            session = m.session(m.train_config, target, world, no_cache=True)
            if pad:
                session.use_batch(max(SIZES))
            rng = np.random.default_rng(i)
            losses = []
            for n in SIZES:
                shape = (n,) + tuple(in_shape[1:])
                x = rng.integers(0, vocab, shape).astype(np.int32) if dtype == "i32" else \
                    rng.random(shape, dtype=np.float32)
                y = fuzz_labels(text, tuple(declared), n)
                losses.append(session.train_step(x, np.zeros(n, np.float32) if y is None else y, 0.1)["loss"])
            results[i] = {"losses": losses, **{k: np.asarray(v).tolist() for k, v in m.state.items()}}
        except dlc.DlcError as e:
            results[i] = {"error": e.message}
    if world is None or world.lead:
        Path(out).write_text(json.dumps(results))
    if world is not None:
        world.end(0)


if __name__ == "__main__":
    main(*sys.argv[1:])

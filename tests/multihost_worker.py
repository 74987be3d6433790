"""One process of the 2-process test (tests/test_multihost.py): 4 CPU devices, gloo collectives.

argv: coordinator process_id run_dir out_json [config overrides...]. Trains through the CLI, then
records the rows of the first global batch this process reads. A coordinator "slurm:PORT" joins
through JAX's own cluster detection instead: the process gets the environment a 2-task SLURM step
on this host gives it, and no distributed.* keys.
"""

import json
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

coordinator, process_id, run_dir, out = sys.argv[1:5]
overrides = sys.argv[5:]
if coordinator.startswith("slurm:"):
    os.environ |= {"SLURM_JOB_ID": "17", "SLURM_NTASKS": "2", "SLURM_PROCID": process_id, "SLURM_LOCALID": process_id}
    os.environ |= {"SLURM_STEP_NODELIST": "127.0.0.1", "JAX_COORDINATOR_PORT": coordinator.split(":")[1]}
    join = []
else:
    join = [
        f"distributed.coordinator={coordinator}",
        "distributed.num_processes=2",
        f"distributed.process_id={process_id}",
    ]

from llm_jax.cli import main  # noqa: E402

try:
    main(
        [
            "train",
            "--config",
            "tiny",
            f"run_dir={run_dir}",
            *join,
            *overrides,
        ]
    )
except SystemExit as e:
    if e.code:
        raise

import jax  # noqa: E402

from llm_jax.config import load_config  # noqa: E402
from llm_jax.data.loader import train_iterator  # noqa: E402
from llm_jax.train.objectives import prepare_data  # noqa: E402

cfg = load_config("tiny", [f"run_dir={run_dir}", *overrides])
data = prepare_data(cfg, Path(run_dir), log=lambda *_: None)
rows = next(train_iterator(data.train, cfg.train.batch_size, cfg.seed, jax.process_index(), jax.process_count()))
with open(out, "w") as f:
    json.dump(
        {
            "process": jax.process_index(),
            "count": jax.process_count(),
            "devices": jax.device_count(),
            "local_devices": jax.local_device_count(),
            "first_rows": rows["tokens"].tolist(),
        },
        f,
    )

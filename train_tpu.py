"""Train PhotoVerse: the same command on every host of a TPU pod slice (or one GPU/CPU machine).

    python train_tpu.py --config configs/tiny.py --workdir /tmp/pv_tiny
    python train_tpu.py --config configs/photoverse_sd15.py --workdir gs://BUCKET/run \\
        --config.base.sd_folder=... --config.base.clip_vision_folder=... \\
        --config.data.data_dir=... --distributed

Any config field can be overridden (``--config.train.batch_size=8``). A run resumes from the
latest checkpoint in ``--workdir``; SIGTERM saves and exits cleanly.
"""

from __future__ import annotations

import json
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from pv_jax.train.trainer import ConfigError, TrainingDiverged, summary_dict, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and summaries go here.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host: TPU pods, clusters)."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (only where JAX cannot detect it)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None, "Fake CPU devices per process (tests and laptops)."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> int:
    """Initialise JAX's distributed runtime if asked, then train."""
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
    if _CPU_DEVICES.value:
        jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
    if _COORDINATOR.value or _DISTRIBUTED.value:
        if jax.config.jax_platforms == "cpu" or _CPU_DEVICES.value:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    try:
        summary = train(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, TrainingDiverged) as e:
        print(f"train_tpu.py: {e}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        print(json.dumps(summary_dict(summary)))
    return 0


if __name__ == "__main__":
    app.run(main)

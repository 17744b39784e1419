"""``python -m pv_jax.evaluation``: see :mod:`pv_jax.evaluation.run`."""

from pv_jax.evaluation.run import cli

cli()

"""``python -m pv_jax.data``: build the face dataset (see ``pv_jax.data.cli``)."""

import sys

from pv_jax.data.cli import main

sys.exit(main())

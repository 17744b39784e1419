"""The gradio page over :class:`pv_jax.app.handler.PhotoVerseApp`: photos, a prompt, the knobs,
and the results (face crops and masks, a gallery with identity similarity, timings).

The page calls the handler and only formats what it returns; its one API endpoint,
``/generate``, takes the same inputs in the same order (``gradio_client``).
"""

from __future__ import annotations

import logging
import os

# No telemetry or version check: this server talks to its own users only.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402

from pv_jax.app.handler import EXAMPLE_PROMPTS, PhotoVerseApp, image_branch_text  # noqa: E402
from pv_jax.errors import InputError  # noqa: E402

log = logging.getLogger("pv_jax.app")

# Markdown's special characters in user text (the prompt's S*, file names).
_MARKDOWN = str.maketrans({c: "\\" + c for c in "\\`*_[]<>#|"})

# Pass to launch(css=...): the results gallery as tall as its rows (gradio's has a minimum).
CSS = "#results .fixed-height { min-height: 0; }"

# The knobs, in the order of the page and of the /generate endpoint after photos and prompt.
KNOBS = (
    "num_images",
    "steps",
    "guidance",
    "seed",
    "num_words",
    "gamma",
    "sigma",
    "alpha",
    "strength",
    "face_index",
)


def escape(text: str) -> str:
    """``text`` shown literally in a gr.Markdown."""
    return text.translate(_MARKDOWN)


def _header(app: PhotoVerseApp, concurrency: int, queue_size: int | None) -> str:
    limits = app.limits
    queue = "any number" if queue_size is None else f"up to {queue_size}"
    return (
        "# PhotoVerse: you, from one photo\n"
        f"Upload 1 to {limits.max_photos} photos of one person, type a prompt with "
        f"**S\\*** where the person goes, and generate. Model: `{app.model}` "
        f"({app.pipe.resolution} px, loaded once in {app.load_s:.1f} s); its image branch "
        f"reads {image_branch_text(app.config)}. Requests run "
        f"{concurrency} at a time, {queue} waiting in the queue; a photo may have at most "
        f"{limits.max_upload_mb:g} MB and {limits.max_megapixels:g} megapixels. The first "
        "request of each shape (number of photos and images, steps, m, img2img) compiles the "
        "sampler; the next ones reuse it."
    )


def build_ui(
    app: PhotoVerseApp, *, concurrency: int = 1, queue_size: int | None = None
) -> gr.Blocks:
    """The page; call ``.queue(...)`` and ``.launch(...)`` on it (see ``pv_jax.app.__main__``)."""
    d, cfg = app.defaults, app.config
    with gr.Blocks(
        title="PhotoVerse (pv-jax)", analytics_enabled=False, delete_cache=(3600, 3600)
    ) as demo:
        gr.Markdown(_header(app, concurrency, queue_size))
        with gr.Row():
            with gr.Column(scale=1):
                photos = gr.File(
                    label=f"Photos of one person (1 to {app.limits.max_photos})",
                    file_count="multiple",
                    file_types=["image"],
                    type="filepath",
                    elem_id="photos",
                )
                prompt = gr.Textbox(
                    label=f"Prompt ({cfg.placeholder} is the person)",
                    value=EXAMPLE_PROMPTS[0],
                    elem_id="prompt",
                )
                gr.Examples([[p] for p in EXAMPLE_PROMPTS], inputs=[prompt], label="Examples")
                with gr.Row():
                    num_images = gr.Slider(
                        1, app.limits.max_images, d.num_images, step=1, label="Images"
                    )
                    steps = gr.Slider(1, app.limits.max_steps, d.steps, step=1, label="Steps")
                with gr.Row():
                    guidance = gr.Slider(0, 15, d.guidance, step=0.5, label="Guidance")
                    seed = gr.Number(d.seed, precision=0, label="Seed (image j: seed + j)")
                with gr.Accordion("PhotoVerse knobs", open=False):
                    num_words = gr.Slider(
                        1, app.max_words, d.num_words, step=1, label="m (pseudo-words)"
                    )
                    gamma = gr.Slider(0, 2, d.gamma, step=0.05, label="gamma (text branch)")
                    sigma = gr.Slider(0, 2, d.sigma, step=0.05, label="sigma (image branch)")
                    alpha = gr.Slider(0, 2, d.alpha, step=0.05, label="alpha (LoRA scale)")
                    strength = gr.Slider(
                        0.05,
                        1,
                        d.strength,
                        step=0.05,
                        label="img2img strength (1: from noise; below: from the photo's crop)",
                    )
                    face_index = gr.Number(
                        d.face_index, precision=0, label="Face index (0: the largest face)"
                    )
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                status = gr.Markdown(elem_id="status")
                gallery = gr.Gallery(
                    label="Results (caption: seed and identity similarity to the photos)",
                    columns=4,
                    height="auto",
                    object_fit="contain",
                    format="png",
                    elem_id="results",
                )
                faces = gr.Image(
                    label="Detected face of each photo: the crop the model sees | its mask",
                    type="numpy",
                    format="png",
                    height=260,
                    interactive=False,
                    buttons=["download", "fullscreen"],
                    elem_id="faces",
                )
                with gr.Accordion("Scores, settings and timings (JSON)", open=False):
                    details = gr.JSON(show_label=False, elem_id="details")

        def generate(  # the parameter names are the /generate endpoint's
            photos,
            prompt,
            num_images,
            steps,
            guidance,
            seed,
            num_words,
            gamma,
            sigma,
            alpha,
            strength,
            face_index,
            progress=gr.Progress(),  # noqa: B008 (gradio's API)
        ):
            knobs = (num_images, steps, guidance, seed, num_words, gamma, sigma, alpha, strength)
            try:
                options = app.options(**dict(zip(KNOBS, (*knobs, face_index), strict=True)))
                r = app.generate(photos or [], prompt, options, progress)
            except InputError as e:  # a setting the options refused
                return f"**Cannot generate:** {escape(str(e))}", [], None, {}
            except Exception as e:  # a bug: the traceback goes to the log, the server goes on
                log.exception("request failed")
                return (
                    f"**Internal error** ({type(e).__name__}: {escape(str(e))}); the server log "
                    "has the traceback",
                    [],
                    None,
                    {},
                )
            if not r.ok:
                return f"**Cannot generate:** {escape(r.message)}", [], None, r.details
            results = list(zip(r.images, r.captions, strict=True))
            sheet = np.concatenate([tile for tile, _ in r.faces])  # a row per photo
            return escape(r.message), results, sheet, r.details

        inputs = [photos, prompt, num_images, steps, guidance, seed, num_words]
        inputs += [gamma, sigma, alpha, strength, face_index]
        button.click(
            generate,
            inputs=inputs,
            outputs=[status, gallery, faces, details],
            api_name="generate",
        )
    return demo

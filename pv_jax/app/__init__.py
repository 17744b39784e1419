"""The web app: upload photos of one person, type a prompt with ``S*``, see the results.

    python -m pv_jax.app --ckpt models/toy_faces/photoverse --port 7860    # or: make serve

``handler`` serves a request without any UI (:class:`PhotoVerseApp`, tested directly); ``ui``
is the gradio page over it (imported only when serving: it needs the ``app`` extra, gradio);
``__main__`` loads the model once and starts the server.
"""

from pv_jax.app.handler import EXAMPLE_PROMPTS, Limits, PhotoVerseApp, Response

__all__ = ["EXAMPLE_PROMPTS", "Limits", "PhotoVerseApp", "Response"]

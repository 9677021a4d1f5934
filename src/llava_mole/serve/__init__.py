"""``llava-mole serve``: an OpenAI-compatible server with dynamic batching and a routing page.

* :mod:`.schema`: request models, response and error bodies.
* :mod:`.inputs`: chat messages and images to prompt ids and pixel values.
* :mod:`.engine`: the batching queue and the generation worker.
* :mod:`.app`: the FastAPI application (``/v1/chat/completions``, ``/v1/models``,
  ``/health``, the web page at ``/``).
* :mod:`.server`: loading the model and running uvicorn.

Needs the ``serve`` extra: ``pip install 'llava-mole[serve]'``.
"""

from .server import ServeOptions, serve

__all__ = ["ServeOptions", "serve"]

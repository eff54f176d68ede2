"""CPU stand-in for ``python_multipart``: FastAPI checks for it (``__version__ > "0.0.12"``) when
sglang's HTTP server registers its form-data route (audio transcription), which rollout never
calls. Parsing a form with this stand-in fails; nothing else is affected."""

__version__ = "0.0.99"
"""Passes FastAPI's presence check only; this is not python-multipart."""

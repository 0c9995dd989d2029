"""`qvlm serve`: a web page and an OpenAI-compatible chat-completions API for a trained model."""

from qvlm.serve.app import create_app
from qvlm.serve.errors import APIError, ServeError
from qvlm.serve.settings import ServeSettings

__all__ = ["APIError", "ServeError", "ServeSettings", "create_app"]

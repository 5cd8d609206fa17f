"""argen: autoregressive image generation on one engine."""

__version__ = "0.1.0"

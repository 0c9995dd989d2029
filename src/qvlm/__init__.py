"""qvlm: build your own small vision-language model the BLIP-2 way."""

__version__ = "0.1.0"

"""edgetune: fine-tune a small language model on a laptop and ship it to a phone or a Pi."""

__version__ = "0.1.0"

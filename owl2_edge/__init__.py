"""owl2-edge: run mPLUG-Owl2 quantized on your own machine."""

__version__ = "0.1.0"

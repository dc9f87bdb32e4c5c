"""owl2-edge: run mPLUG-Owl2 quantized on your own machine.

    from owl2_edge import Owl2
    owl = Owl2.load("owl2-7b-Q4_K_M")
    print(owl.ask("photo.jpg", "What is written on the sign?"))
"""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so `import owl2_edge.names` (the converter does) loads no native code.
    if name in ("Owl2", "Chat"):
        from owl2_edge import owl2
        return getattr(owl2, name)
    raise AttributeError(name)

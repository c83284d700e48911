"""imagen-lite: Imagen-style cascades and DALL-E 2-style unCLIP behind one ``generate()``.

Importing this package touches neither the network nor the GPU: heavy modules load lazily.
"""

__version__ = "0.1.0"

__all__ = ["generate", "load_pipeline", "compare"]


def __getattr__(name):  # lazy public names: keeps ``import imagen_lite`` cheap
    if name in ("generate", "load_pipeline"):
        from . import api

        return getattr(api, name)
    if name == "compare":
        from .evaluation.compare import compare

        return compare
    raise AttributeError(f"module 'imagen_lite' has no attribute {name!r}")

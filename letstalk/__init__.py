"""LetsTalk: latent diffusion transformer for talking video (model library, pure PyTorch)."""

from importlib import import_module

__version__ = "0.1.0"
# Loaded on first use (PEP 562): the transformer pulls in diffusers and torch (seconds), which a
# process that only decodes video, measures mouths or parses a command line never needs.
_EXPORTS = {"PRESETS": "config", "LetsTalkConfig": "config", "LetsTalkTransformer": "transformer",
            "AudioProjection": "transformer", "count_parameters": "transformer"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value

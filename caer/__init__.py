"""caer: context-aware academic emotion recognition on CLIP, with a feature cache."""

__version__ = "0.1.0"

"""LetsTalk platform: Ray Data preprocessing, Ray Train + DeepSpeed training, Ray Serve rendering.

The model library (`letstalk`) stands alone; this package imports it, never the reverse.
"""

__version__ = "0.1.0"

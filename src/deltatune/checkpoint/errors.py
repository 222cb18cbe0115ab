"""The error every part of the checkpoint package raises for a file or state dict that cannot be loaded."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded (corrupt file, wrong shapes, unknown keys)."""


__all__ = ["CheckpointError"]

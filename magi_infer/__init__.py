"""magi inference: `MagiPipeline` (Python), `magi-generate` (CLI, magi_infer/generate.py), `magi-serve` (server).

The names below are imported when first used, so `import magi_infer` costs nothing."""

__all__ = ["MagiPipeline", "VideoOutput", "ChunkOutput", "LivePrompts", "Cancelled"]


def __getattr__(name):
    if name in __all__:
        from magi_infer import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'magi_infer' has no attribute {name!r}")

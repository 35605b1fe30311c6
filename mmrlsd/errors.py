"""Error types whose messages name the file, field, key or record at fault (importable without torch)."""


class MmrlsdError(ValueError):
    """Base class: a problem with user input, reported as `error: <message>` by the CLI (exit code 2)."""


class ConfigError(MmrlsdError):
    """A config problem; the message names the file and the key."""


class DataError(MmrlsdError):
    """A data source that cannot be read at all (missing file, unknown format, no usable record)."""


class ModelError(MmrlsdError):
    """A checkpoint that cannot be used (missing, not a vision-language model, unsupported architecture)."""


class RecordError(MmrlsdError):
    """A record that cannot be used (an image, its prompt length); training skips and counts it."""


class ImageError(RecordError):
    """An image that cannot be used; the record is skipped and counted."""


class CheckpointError(MmrlsdError):
    """A training checkpoint that is damaged (truncated shard, empty state file, garbage RNG file)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file that would run code when loaded (a pickle naming a forbidden global): never loaded."""


class TrainingError(MmrlsdError):
    """A run that cannot go on (weights no longer finite, too many skipped steps); the newest checkpoint is intact."""

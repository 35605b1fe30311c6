"""mmrlsd: RLSD (RLVR with self-distillation) for Qwen-VL vision-language models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mmrlsd")
except PackageNotFoundError:  # a source checkout that was not pip-installed
    __version__ = "0+unknown"

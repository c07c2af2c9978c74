"""facemux server: gRPC services over the shared-encoder face-swap model."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("facemux")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"

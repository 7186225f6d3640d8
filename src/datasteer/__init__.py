"""datasteer: steer language models through the synthetic data they are trained on."""

__version__ = "0.1.0"

from datasteer.errors import DatasteerError  # noqa: E402

__all__ = ["DatasteerError", "__version__"]

"""flashpack: run language models larger than DRAM from flash storage.

The Python face of the Rust library (the same code as the ``flashpack``
command line): ``convert`` a Hugging Face checkpoint into a packed file,
``verify`` and ``inspect`` it, each returning the dict the command's
``--json`` prints. Work runs with the GIL released. Failures raise
``FlashpackError`` subclasses carrying the command line's exit class.
"""

from ._errors import (
    CheckFailedError,
    EnvironmentFailureError,
    FlashpackError,
    InvalidInputError,
)
from ._native import __version__, convert, inspect, verify

__all__ = [
    "CheckFailedError",
    "EnvironmentFailureError",
    "FlashpackError",
    "InvalidInputError",
    "__version__",
    "convert",
    "inspect",
    "verify",
]

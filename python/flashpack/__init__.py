"""flashpack: run language models larger than DRAM from flash storage.

The Python face of the Rust library (the same code as the ``flashpack``
command line): ``convert`` a Hugging Face checkpoint into a packed file,
``verify`` and ``inspect`` it, each returning the dict the command's
``--json`` prints; ``open`` a checkpoint or packed file as a model (any FFN
mode, from flash under a DRAM budget) to ``generate``, ``stream``, take
``logits`` (numpy) and ``perplexity``. Work runs with the GIL released.
Failures raise ``FlashpackError`` subclasses carrying the command line's exit
class.
"""

from ._errors import (
    CheckFailedError,
    EnvironmentFailureError,
    FlashpackError,
    InvalidInputError,
)
from ._native import Model, Stream, __version__, convert, inspect, open, verify

# `open` is left out of `__all__`: `from flashpack import *` must not hide the
# builtin; write `flashpack.open(...)`.
__all__ = [
    "CheckFailedError",
    "EnvironmentFailureError",
    "FlashpackError",
    "InvalidInputError",
    "Model",
    "Stream",
    "__version__",
    "convert",
    "inspect",
    "verify",
]

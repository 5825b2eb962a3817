# Type stubs of the Rust extension module (python/src/lib.rs).
import os
from typing import Any, Dict, Optional, Sequence, Union

_Path = Union[str, "os.PathLike[str]"]
_Paths = Union[_Path, Sequence[_Path]]

__version__: str

def convert(
    src: _Path,
    out: _Path,
    *,
    dtype: str = "keep",
    zstd_level: int = 3,
    align: int = 4096,
    quant: Optional[str] = None,
    selector: str = "auto",
    calib: Optional[_Paths] = None,
    calib_tokens: int = 16384,
    rank: Union[int, str, None] = None,
    target_recall: float = 0.99,
    target_sparsity: float = 0.5,
    seed: int = 0,
    keep_trace: Optional[_Path] = None,
    sparsity_allocation: str = "uniform",
    verify: bool = False,
) -> Dict[str, Any]:
    """Convert a Hugging Face checkpoint directory (or a Hub id in the local
    cache) into a flashpack file at ``out``, written atomically.

    ``dtype``: ``keep``, ``f32``, ``f16`` or ``bf16``; ``quant``: ``q8``, ``q4``
    or per part ``"ffn=q4,attn=q8"``; ``selector``: ``auto``, ``none``,
    ``int8``, ``int4``. With ``calib`` (text files): calibration, hot-first
    neuron order and predictors (``calib_tokens``, ``rank`` (a number or
    ``"auto"``), ``target_recall``, ``target_sparsity``, ``seed``,
    ``keep_trace``, ``sparsity_allocation`` ``uniform``/``greedy``).
    ``verify``: check the written file against the checkpoint (a failure
    raises ``CheckFailedError`` with the report).

    Returns the dict ``flashpack convert --json`` prints.
    """

def verify(
    path: _Path,
    against: Optional[_Path] = None,
    *,
    text: Optional[_Path] = None,
    calib: Optional[_Paths] = None,
    min_recall: float = 0.95,
    calib_tokens: int = 4096,
    check: bool = True,
) -> Dict[str, Any]:
    """Verify a flashpack file: every hash and rule; with ``against`` (the
    source checkpoint) every weight and the logits; with ``text`` (a quantized
    file) the perplexity against the source's; with ``calib`` each predictor's
    recall (at least ``min_recall``).

    Returns the dict ``flashpack verify --json`` prints. A failed check raises
    ``CheckFailedError`` (its ``report`` is that dict) unless ``check`` is
    false, when the dict comes back with ``ok`` false.
    """

def inspect(path: _Path) -> Dict[str, Any]:
    """What a checkpoint directory or flashpack file holds: the dict
    ``flashpack inspect --json`` prints."""

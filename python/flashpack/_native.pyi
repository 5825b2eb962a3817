# Type stubs of the Rust extension module (python/src/lib.rs).
import os
import pathlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import numpy

_Path = Union[str, "os.PathLike[str]"]
_Paths = Union[_Path, Sequence[_Path]]

__version__: str

def convert(
    src: _Path,
    out: _Path,
    *,
    dtype: str = "keep",
    zstd_level: int = 3,
    alignment: int = 4096,
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
    progress: Optional[Callable[[str, int, int], None]] = None,
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
    raises ``CheckFailedError`` with the report). ``progress(phase, done,
    total)`` is called as the work goes on (phases ``calibrating``,
    ``choosing thresholds``, ``neuron statistics``, ``training predictors``,
    ``writing``, ``hashing sources``; each reaches ``done == total``), from
    the library's threads.

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

def open(
    path: _Path,
    *,
    ffn: Optional[str] = None,
    dram_budget: Optional[str] = None,
    window: Optional[int] = None,
    io_threads: Optional[int] = None,
    io_engine: Optional[str] = None,
    coalesce_gap: Optional[int] = None,
    verify_reads: bool = True,
    selector: Optional[str] = None,
    context: Optional[int] = None,
    threads: Optional[int] = None,
) -> Model:
    """Open a checkpoint directory or flashpack file (or a Hub id in the
    local cache) as a model.

    ``ffn``: ``dense``, ``oracle``, ``predicted`` (in DRAM) or ``naive``,
    ``flash``, ``oracle-flash`` (the FFN read from the file); None: ``flash``
    for a calibrated packed file, else ``dense``. The other options are
    ``flashpack run``'s for the disk modes (``dram_budget`` as ``"32MiB"``
    or ``"50%"``; ``io_engine`` ``auto``/``uring``/``threads``; ``selector``
    ``auto``/``trained``/``int8``/``int4``); giving one to an in-DRAM mode
    raises ``InvalidInputError``. ``context``: most positions the KV cache
    holds; ``threads``: worker threads (results do not depend on it).
    """

class Model:
    """A model opened by :func:`open`. Calls from several threads take turns."""

    @property
    def ffn(self) -> str:
        """The FFN mode it runs in."""
    @property
    def path(self) -> pathlib.Path:
        """The model's path (a Hub id resolved to its snapshot)."""
    @property
    def vocab_size(self) -> int:
        """Columns of :meth:`logits`."""
    @property
    def max_context(self) -> int:
        """Most positions of the model's context."""
    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 128,
        *,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        min_p: Optional[float] = None,
        repeat_penalty: Optional[float] = None,
        seed: Optional[int] = None,
        stop: Optional[List[str]] = None,
    ) -> Dict[str, Any]:
        """Generate after ``prompt``; returns the dict ``flashpack run --json``
        prints (``text``, ``generated_ids``, ``prompt_ids``, ``stop_reason``,
        timings, bytes read). Sampling options left out come from the model's
        generation_config.json, else greedy."""
    def stream(
        self,
        prompt: str,
        max_new_tokens: int = 128,
        *,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        min_p: Optional[float] = None,
        repeat_penalty: Optional[float] = None,
        seed: Optional[int] = None,
        stop: Optional[List[str]] = None,
    ) -> Stream:
        """As :meth:`generate`, yielding each piece of text as soon as it is final."""
    def logits(self, ids: Sequence[int]) -> "numpy.ndarray":
        """Logits of every position of ``ids`` computed as one prompt: float32,
        shape ``(len(ids), vocab_size)``, equal to ``run --logits-out``'s rows."""
    def perplexity(self, text: str, ctx: int = 256) -> float:
        """Perplexity of ``text`` in windows of ``ctx`` tokens, as ``flashpack eval``."""
    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` under the model's tokenizer."""

class Stream(Iterator[str]):
    """The pieces of text of one generation (:meth:`Model.stream`)."""

    def __iter__(self) -> Stream: ...
    def __next__(self) -> str: ...
    @property
    def report(self) -> Optional[Dict[str, Any]]:
        """``generate``'s dict once the stream is exhausted, else None."""

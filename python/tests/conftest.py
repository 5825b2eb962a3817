"""Shared fixtures: the repository's bundled models and text, the command-line
binary the package is compared with, and one calibrated packed file."""

import json
import os
import subprocess
from pathlib import Path

import pytest

import flashpack

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures"


def cli_binary() -> Path:
    """The `flashpack` binary: $FLASHPACK_BIN, else the release build."""
    path = Path(os.environ.get("FLASHPACK_BIN", ROOT / "target" / "release" / "flashpack"))
    if not path.is_file():
        pytest.fail(f"{path} not found: build it with `cargo build --release` (or set FLASHPACK_BIN)")
    return path


def cli_run(*args: str):
    """Runs `flashpack ARGS --json`: its exit code and its one JSON object."""
    out = subprocess.run(
        [str(cli_binary()), *map(str, args), "--json"], capture_output=True, text=True, check=False
    )
    return out.returncode, json.loads(out.stdout)


def cli_json(*args: str, expect: int = 0) -> dict:
    """Runs `flashpack ARGS --json`, which must exit with `expect`, and returns
    its one JSON object."""
    code, value = cli_run(*args)
    assert code == expect, value
    return value


@pytest.fixture(scope="session")
def opt_relu() -> Path:
    return FIXTURES / "models" / "opt-relu"


@pytest.fixture(scope="session")
def train_text() -> Path:
    return FIXTURES / "text" / "train.txt"


@pytest.fixture(scope="session")
def heldout_text() -> Path:
    return FIXTURES / "text" / "heldout.txt"


# The options tests/cli_json.rs converts its calibrated file with.
CALIB_TOKENS = 1024


@pytest.fixture(scope="session")
def calibrated(tmp_path_factory, opt_relu, train_text) -> Path:
    """opt-relu converted by the package with calibration and predictors."""
    out = tmp_path_factory.mktemp("packed") / "opt-relu.flashpack"
    report = flashpack.convert(opt_relu, out, calib=train_text, calib_tokens=CALIB_TOKENS)
    assert report["output"] == str(out)
    return out

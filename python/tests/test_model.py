"""flashpack.open: the model's generate, stream, logits and perplexity equal
what the command line computes for the same file and options."""

import numpy as np
import pytest

import flashpack
from conftest import FIXTURES, cli_json

PROMPT = "KING HENRY."


@pytest.fixture(scope="module")
def flash_model(calibrated):
    # The KV cache for 64 positions, as `run` sizes it for a short prompt:
    # the 32 MiB the CLI runs in below then holds.
    return flashpack.open(calibrated, ffn="flash", dram_budget="32MiB", context=64)


def test_generate_has_the_run_keys_and_tokens(calibrated, flash_model):
    cli = cli_json(
        "run", calibrated, "--ffn", "flash", "--dram-budget", "32MiB",
        "-p", PROMPT, "-n", "12", "--seed", "1", "--temperature", "0.8",
    )
    py = flash_model.generate(PROMPT, max_new_tokens=12, seed=1, temperature=0.8)
    assert sorted(py) == sorted(cli)
    for key in ["prompt_ids", "generated_ids", "text", "stop_reason", "seed", "ffn", "ctx"]:
        assert py[key] == cli[key], key
    assert py["generated_tokens"] == len(py["generated_ids"]) == 12
    assert py["read_bytes"] > 0 and py["flash"] is not None


def test_stream_yields_the_generated_text(flash_model):
    whole = flash_model.generate(PROMPT, max_new_tokens=20)
    stream = flash_model.stream(PROMPT, max_new_tokens=20)
    pieces = list(stream)
    assert len(pieces) > 1
    assert "".join(pieces) == whole["text"]
    assert stream.report["generated_ids"] == whole["generated_ids"]
    # An abandoned stream does not hold the model.
    partial = flash_model.stream(PROMPT, max_new_tokens=20)
    next(partial)
    assert flash_model.generate(PROMPT, max_new_tokens=3)["generated_tokens"] == 3
    del partial


def test_logits_equal_the_cli_logits_out(tmp_path, calibrated, flash_model):
    npy = tmp_path / "logits.npy"
    cli = cli_json(
        "run", calibrated, "--ffn", "flash", "--dram-budget", "32MiB",
        "-p", PROMPT, "-n", "0", "--logits-out", npy,
    )
    expected = np.load(npy)
    got = flash_model.logits(cli["prompt_ids"])
    assert got.dtype == np.float32
    assert got.shape == expected.shape == (len(cli["prompt_ids"]), flash_model.vocab_size)
    assert np.array_equal(got, expected)
    assert flash_model.encode(PROMPT) == cli["prompt_ids"]


def test_logits_of_the_dense_checkpoint_equal_the_cli(tmp_path, opt_relu):
    npy = tmp_path / "dense.npy"
    cli = cli_json("run", opt_relu, "-p", PROMPT, "-n", "0", "--logits-out", npy)
    model = flashpack.open(opt_relu)
    assert model.ffn == "dense"
    assert np.array_equal(model.logits(cli["prompt_ids"]), np.load(npy))


def test_perplexity_equals_eval(tmp_path, calibrated, heldout_text):
    text = heldout_text.read_text()[:6000]
    sample = tmp_path / "sample.txt"
    sample.write_text(text)
    for ffn in ["predicted", "flash"]:
        cli = cli_json("eval", calibrated, "--text", sample, "--ffn", ffn)
        model = flashpack.open(calibrated, ffn=ffn)
        assert model.perplexity(text) == cli["perplexity"], ffn


def test_open_errors_carry_the_exit_class(calibrated, opt_relu):
    with pytest.raises(flashpack.InvalidInputError, match="ffn"):
        flashpack.open(calibrated, ffn="sparse")
    # A budget below the plan's minimum is invalid input, as for `run`.
    with pytest.raises(flashpack.InvalidInputError):
        flashpack.open(calibrated, ffn="flash", dram_budget="1KB")
    # Options only the disk modes use are refused for a model in DRAM.
    with pytest.raises(flashpack.InvalidInputError, match="window"):
        flashpack.open(opt_relu, window=2)
    with pytest.raises(flashpack.InvalidInputError):
        flashpack.open(FIXTURES / "broken" / "r01-bad-magic.flashpack")
    model = flashpack.open(opt_relu)
    with pytest.raises(flashpack.InvalidInputError, match="vocabulary"):
        model.logits([model.vocab_size])
    with pytest.raises(flashpack.InvalidInputError):
        model.generate(PROMPT, top_p=2.0, temperature=1.0)


def test_a_damaged_ffn_chunk_stops_the_run_as_a_failed_check():
    damaged = FIXTURES / "broken" / "r14-ffn-chunk-byte-flipped.flashpack"
    model = flashpack.open(damaged, ffn="naive")
    with pytest.raises(flashpack.CheckFailedError):
        model.generate(PROMPT, max_new_tokens=2)


def test_calls_from_several_threads_take_turns(flash_model):
    import threading

    expected = flash_model.generate(PROMPT, max_new_tokens=8)["generated_ids"]
    results = []

    def work():
        results.append(flash_model.generate(PROMPT, max_new_tokens=8)["generated_ids"])

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 3

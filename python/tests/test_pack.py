"""convert, verify and inspect through the package against the command line:
the same bytes, the same reports, the same exit classes."""

import threading
import pytest

import flashpack
from conftest import CALIB_TOKENS, FIXTURES, cli_json, cli_run

BROKEN = FIXTURES / "broken"


def test_convert_writes_the_bytes_the_cli_writes(tmp_path, calibrated, opt_relu, train_text):
    cli_file = tmp_path / "cli.flashpack"
    cli = cli_json(
        "convert", str(opt_relu), "-o", str(cli_file),
        "--calib", str(train_text), "--calib-tokens", str(CALIB_TOKENS),
    )
    assert cli_file.read_bytes() == calibrated.read_bytes()
    py_file = tmp_path / "py.flashpack"
    py = flashpack.convert(opt_relu, py_file, calib=[train_text], calib_tokens=CALIB_TOKENS)
    assert sorted(py) == sorted(cli)
    # Everything but the paths and the times is the same.
    for key, value in cli.items():
        if key == "output" or key.endswith("_ms"):
            continue
        if key == "predictors":
            strip = lambda rows: [{k: v for k, v in r.items() if k != "train_ms"} for r in rows]
            assert strip(py[key]) == strip(value)
        else:
            assert py[key] == value, key


def test_convert_reports_progress_to_a_callback(tmp_path, opt_relu, train_text):
    seen = {}
    lock = threading.Lock()

    def progress(phase, done, total):
        with lock:
            last = seen.setdefault(phase, [0, total])
            last[0] = max(last[0], done)
            assert total == last[1]

    flashpack.convert(opt_relu, tmp_path / "p.flashpack", calib=train_text, calib_tokens=256, progress=progress)
    assert {"calibrating", "training predictors", "writing", "hashing sources"} <= set(seen), seen
    assert all(done == total for done, total in seen.values()), seen


def test_convert_with_verify_reports_the_weights_compared(tmp_path, opt_relu):
    out = tmp_path / "f16.flashpack"
    report = flashpack.convert(opt_relu, out, dtype="f16", zstd_level=0, verify=True)
    assert report["verified"] is True
    assert report["verify"]["ok"] is True
    assert report["verify"]["weights_mismatched"] == 0
    assert report["verify"]["weights_compared"] > 0
    # A dtype-narrowing conversion is not held to the logit limit.
    assert report["verify"]["logit_nmse_gated"] is False
    assert flashpack.inspect(out)["convert_dtype"] == "f16"


def test_verify_equals_the_cli_report(calibrated, opt_relu, heldout_text):
    args = (str(calibrated), "--against", str(opt_relu), "--calib", str(heldout_text))
    cli = cli_json("verify", *args)
    py = flashpack.verify(calibrated, against=opt_relu, calib=heldout_text)
    assert py == cli
    assert py["ok"] is True and py["weights_mismatched"] == 0
    assert len(py["predictor_recall"]) == 4
    assert flashpack.verify(calibrated) == cli_json("verify", str(calibrated))


def test_a_quantized_file_verifies_against_its_limits_as_the_cli(tmp_path, opt_relu, heldout_text):
    packed = tmp_path / "q8.flashpack"
    flashpack.convert(opt_relu, packed, quant="ffn=q8,attn=q8")
    sample = tmp_path / "sample.txt"
    sample.write_text(heldout_text.read_text()[:4000])
    cli = cli_json("verify", packed, "--against", opt_relu, "--text", sample)
    py = flashpack.verify(packed, against=opt_relu, text=sample)
    assert py == cli
    assert py["ok"] is True and py["quant_errors"] and py["perplexity_ratio"] is not None
    assert flashpack.inspect(packed)["quantization"]["ffn"] == "q8_0"


def test_inspect_equals_the_cli_report(calibrated, opt_relu):
    assert flashpack.inspect(calibrated) == cli_json("inspect", str(calibrated))
    assert flashpack.inspect(opt_relu) == cli_json("inspect", str(opt_relu))
    report = flashpack.inspect(str(calibrated))
    assert report["format"] == "flashpack" and report["has_predictors"] is True


def test_a_damaged_file_raises_check_failed_with_the_report():
    damaged = BROKEN / "r14-dense-byte-flipped.flashpack"
    cli = cli_json("verify", str(damaged), expect=1)
    with pytest.raises(flashpack.CheckFailedError) as info:
        flashpack.verify(damaged)
    err = info.value
    assert err.exit_code == 1 == cli["exit_code"]
    assert err.exit_class == "check_failed"
    assert isinstance(err, flashpack.FlashpackError)
    assert str(err) == cli["error"]
    assert err.report["ok"] is False
    assert err.report["failures"] == cli["failures"]
    # check=False returns the failed report instead.
    report = flashpack.verify(damaged, check=False)
    assert report["ok"] is False and report["failures"] == cli["failures"]


def failures():
    """(a package call, the same command line) for each kind of failure."""
    text = FIXTURES / "text" / "heldout.txt"
    model = FIXTURES / "models" / "opt-relu"
    cases = [
        (lambda name=name: flashpack.verify(BROKEN / f"{name}.flashpack"), ["verify", BROKEN / f"{name}.flashpack"])
        for name in ["r01-bad-magic", "r04-truncated", "r12-section-hash", "r19-order-not-permutation"]
    ]
    cases += [
        (lambda: flashpack.inspect("/nonexistent/model"), ["inspect", "/nonexistent/model"]),
        (
            lambda: flashpack.verify(BROKEN / "base.flashpack", against=model),
            ["verify", BROKEN / "base.flashpack", "--against", model],
        ),
        (
            lambda: flashpack.convert(model, "/proc/flashpack-test.flashpack"),
            ["convert", model, "-o", "/proc/flashpack-test.flashpack"],
        ),
        (
            lambda: flashpack.convert(model, "/nonexistent/dir/x.flashpack", calib=text),
            ["convert", model, "-o", "/nonexistent/dir/x.flashpack", "--calib", text],
        ),
    ]
    return cases


CLASSES = {
    1: flashpack.CheckFailedError,
    2: flashpack.InvalidInputError,
    3: flashpack.EnvironmentFailureError,
}


@pytest.mark.parametrize("call,args", failures())
def test_every_failure_raises_the_cli_exit_class_and_message(call, args):
    code, cli = cli_run(*args)
    assert code in CLASSES, cli
    with pytest.raises(flashpack.FlashpackError) as info:
        call()
    assert type(info.value) is CLASSES[code]
    assert info.value.exit_code == code == cli["exit_code"]
    assert str(info.value) == cli["error"]


def test_bad_arguments_are_invalid_input_and_value_errors(tmp_path, opt_relu):
    train = FIXTURES / "text" / "train.txt"
    with pytest.raises(flashpack.InvalidInputError) as info:
        flashpack.convert(opt_relu, tmp_path / "x.flashpack", dtype="f8")
    assert info.value.exit_code == 2 and isinstance(info.value, ValueError)
    with pytest.raises(flashpack.InvalidInputError, match="rank"):
        flashpack.convert(opt_relu, tmp_path / "x.flashpack", calib=train, rank=0)
    # Library errors name the option as the keyword argument is named.
    with pytest.raises(flashpack.InvalidInputError, match="^alignment: 3 must be a power of two"):
        flashpack.convert(opt_relu, tmp_path / "x.flashpack", alignment=3)
    with pytest.raises(flashpack.InvalidInputError, match="quant"):
        flashpack.convert(opt_relu, tmp_path / "x.flashpack", quant="q3")
    with pytest.raises(flashpack.InvalidInputError, match="source"):
        flashpack.verify(BROKEN / "base.flashpack", text=FIXTURES / "text" / "heldout.txt")
    with pytest.raises(flashpack.InvalidInputError, match="recall"):
        flashpack.verify(BROKEN / "base.flashpack", calib=train, min_recall=1.5)
    # Nothing was written by the refused conversions.
    assert not (tmp_path / "x.flashpack").exists()


def test_the_gil_is_released_while_the_library_works(calibrated, opt_relu):
    count = 0
    stop = threading.Event()

    def spin():
        nonlocal count
        while not stop.is_set():
            count += 1

    thread = threading.Thread(target=spin)
    thread.start()
    try:
        before = count
        flashpack.verify(calibrated, against=opt_relu)
        during = count - before
    finally:
        stop.set()
        thread.join()
    # With the GIL held for the whole call the other thread could not count.
    assert during > 1000, during

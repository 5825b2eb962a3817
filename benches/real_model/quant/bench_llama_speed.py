# llama.cpp (llama-cpp-python) speed on SmolLM2-135M GGUFs, the measurement flashpack's
# `run --json` makes: prefill of a prompt (the first PREFILL held-out tokens, HF ids) and
# greedy decode of DECODE tokens after it, at THREADS threads; best of REPEATS runs.
# Usage: python bench_llama_speed.py THREADS PREFILL DECODE REPEATS MODEL.gguf...  (one JSON line per model)
import sys, time, json
import llama_cpp.llama_cpp as _lc
import llama_cpp.llama as _ll
# The repacked (extra buffer: AMX/AVX-512) CPU kernels crash on this VM for quantized types; use the plain ones.
_orig = _lc.llama_model_default_params
def _params():
    p = _orig()
    p.use_extra_bufts = False
    return p
_lc.llama_model_default_params = _params
_ll.llama_cpp.llama_model_default_params = _params
from llama_cpp import Llama
from tokenizers import Tokenizer
tok = Tokenizer.from_file("/root/smol/out/smollm2-135m/tokenizer.json")
threads, prefill, decode, repeats = (int(a) for a in sys.argv[1:5])
prompt = tok.encode(open("/root/smol/out/heldout.txt").read(), add_special_tokens=False).ids[:prefill]
for path in sys.argv[5:]:
    llm = Llama(model_path=path, n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    best_prefill, best_decode = 0.0, 0.0
    for _ in range(repeats):
        llm.reset()
        t0 = time.time()
        llm.eval(prompt)
        t1 = time.time()
        best_prefill = max(best_prefill, len(prompt) / (t1 - t0))
        tok_id = int(max(range(llm.n_vocab()), key=lambda i: llm.scores[llm.n_tokens - 1][i]))
        t2 = time.time()
        for _ in range(decode):
            llm.eval([tok_id])
            row = llm.scores[llm.n_tokens - 1]
            tok_id = int(row.argmax())
        t3 = time.time()
        best_decode = max(best_decode, decode / (t3 - t2))
    print(json.dumps({"model": path, "threads": threads, "prefill_tokens": len(prompt), "decode_tokens": decode,
                      "prefill_tokens_per_s": best_prefill, "decode_tokens_per_s": best_decode,
                      "repeats": repeats}), flush=True)

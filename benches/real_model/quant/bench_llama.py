# llama.cpp (llama-cpp-python) on SmolLM2-135M GGUFs: held-out perplexity on the same ids and windows
# as flashpack eval (HF tokenizer ids, windows of 256, every token but the first of a window scored),
# and greedy decode tokens/s at 2 threads.
# Usage: python bench_llama.py THREADS MODEL.gguf...  (one JSON line per model)
import sys, math, time, json
import numpy as np
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
ids = tok.encode(open("/root/smol/out/heldout.txt").read(), add_special_tokens=False).ids
threads = int(sys.argv[1])
for path in sys.argv[2:]:
    llm = Llama(model_path=path, n_ctx=512, n_batch=256, n_threads=threads, n_threads_batch=threads,
                logits_all=True, verbose=False)
    nll, n, t0 = 0.0, 0, time.time()
    for s in range(0, len(ids), 256):
        w = ids[s:s + 256]
        if len(w) < 2:
            break
        llm.reset()
        llm.eval(w)
        logits = np.array(llm.scores[:len(w)], dtype=np.float64)
        for i in range(len(w) - 1):
            row = logits[i]
            m = row.max()
            nll += m + math.log(np.exp(row - m).sum()) - row[w[i + 1]]
            n += 1
    ppl = math.exp(nll / n)
    t_ppl = time.time() - t0
    llm.reset()
    prompt = tok.encode("The capital of France is", add_special_tokens=False).ids
    t0 = time.time()
    out = []
    for i, t in enumerate(llm.generate(prompt, temp=0.0)):
        if i == 0:
            t1 = time.time()
        out.append(t)
        if len(out) >= 129:
            break
    t2 = time.time()
    print(json.dumps({"model": path, "tokens_scored": n, "perplexity": ppl, "ppl_s": t_ppl,
                      "decode_tokens_per_s": 128 / (t2 - t1), "threads": threads}), flush=True)

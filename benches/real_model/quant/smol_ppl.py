# transformers perplexity of SmolLM2-135M with parts dequantized by the numpy reference quantizers
# Usage: python smol_ppl.py q8:all q8:down:row q8:down:smooth q4:embed ...  (type:part[:col|row|smooth|sqrt])
# smooth: down's output channels divided by their max |w| before column blocking (multiplied back); sqrt: by its square root
import sys, os, math, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../../fixtures"))
import numpy as np, torch
import quant_reference as qr
import make_fixtures as mf
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(1)
d = "/root/smol/out/smollm2-135m"
tok = AutoTokenizer.from_pretrained(d)
ids = tok(open("/root/smol/out/heldout.txt").read())["input_ids"]
def run(label, fn, kinds):
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            k = qr.kind_of(name)
            if p.ndim != 2 or k is None or k not in kinds: continue
            x = p.detach().numpy()
            if k == "down_proj" and MODE == "row":
                deq = fn(x)[-1]
            elif k == "down_proj" and MODE in ("smooth", "sqrt"):
                c = np.abs(x).max(axis=1, keepdims=True).astype(np.float32)
                if MODE == "sqrt": c = np.sqrt(c)
                c = np.where(c == 0, 1, c)
                deq = np.ascontiguousarray(fn(np.ascontiguousarray((x / c).T))[-1].T) * c
            elif k == "down_proj":
                deq = np.ascontiguousarray(fn(np.ascontiguousarray(x.T))[-1].T)
            else:
                deq = fn(x)[-1]
            p.copy_(torch.from_numpy(deq))
        t = time.time()
        n, nll, ppl = mf.perplexity(model, ids)
    print(label, n, round(ppl, 4), f"{time.time()-t:.0f}s", flush=True)
ATT = {"q_proj","k_proj","v_proj","o_proj"}; FFN = {"gate_proj","up_proj","down_proj"}
MODE = "col"
for spec in sys.argv[1:]:
    q, part = spec.split(":")[:2]
    MODE = spec.split(":")[2] if spec.count(":") == 2 else "col"
    fn = {"q8": qr.q8_0, "q4": qr.q4_1, "q40": qr.q4_0, "none": None}[q]
    kinds = {"all": ATT|FFN|{"embed_tokens"}, "attn": ATT, "ffn": FFN, "down": {"down_proj"}, "embed": {"embed_tokens"}}[part]
    if fn is None: kinds = set(); fn = qr.q8_0
    run(spec, fn, kinds)

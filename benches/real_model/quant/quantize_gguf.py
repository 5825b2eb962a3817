# Usage: python quantize_gguf.py IN.gguf OUT.gguf q4_0|q4_1|q4_k_m  (llama.cpp's quantizer through llama-cpp-python)
import sys, ctypes, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = {"q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1,
                "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[sys.argv[3]]
params.nthread = 2
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params))
print("rc", rc)

"""Record per-layer FFN inputs/activations of C4 windows for the predictor research (docs/research.md).
usage: python research/research_record.py OUT_DIR FIRST_WINDOW N_WINDOWS"""
import sys, time, torch
torch.set_num_threads(1)
from shadowsparse.llm import load_llm, LLMConfig
from shadowsparse.data import token_windows, WindowSpec, TextSource
from shadowsparse.ffn_io import record_ffn_io
out, first, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model, tok = load_llm(LLMConfig())
src = TextSource(path="json", data_files="data/c4_validation_sample/c4_validation_2k.jsonl", separator="\n\n")
w = token_windows(tok, WindowSpec(512, first + n, src))[first:first + n]
assert len(w) == n, len(w)
t = time.time()
meta = record_ffn_io(model, w, list(range(1, 30)), out, layer_inputs=(3, 15, 27))
print("recorded", meta["n"], "tokens in", round(time.time() - t), "s")

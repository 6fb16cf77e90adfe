"""Save ||W_down[:, i]|| per layer and the probe layers' gate weights for research/research_probe.py."""
import torch
from shadowsparse.llm import load_llm, LLMConfig
from shadowsparse.arch import ModelView
model, _ = load_llm(LLMConfig())
v = ModelView(model)
torch.save({l: v.ffn_down(l).weight.detach().float().norm(dim=0) for l in range(v.dims.n_layers)},
           "outputs/research/down_col_norms.pt")
torch.save({l: v.layer(l).mlp.gate_proj.weight.detach().clone() for l in (3, 15, 27)}, "outputs/research/gate_weights.pt")
torch.save({l: v.layer(l).mlp.up_proj.weight.detach().clone() for l in (3, 15, 27)}, "outputs/research/up_weights.pt")

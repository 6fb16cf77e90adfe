"""Decode speed of the gated runtime against its own dense engine and Hugging Face generate, on one GPU.

    python benchmark.py bench=opt13b                       # conf/bench/opt13b.yaml
    python benchmark.py bench=all bench.gen=64 "bench.batches=[1,8]" bench.out=$OUT/benchmark.jsonl
    python benchmark.py --help                             # the experiments and every key with its value

Config: a Hydra app over conf/benchmark.yaml. bench=<name> picks conf/bench/<name>.yaml (default.yaml, or an
experiment file that extends it), then bench.<key>=<value> overrides. BenchConfig below is the schema, registered
in Hydra's ConfigStore: a value of the wrong type (bench.batches=abc) is refused when the config is composed,
before any model is built, and check() then refuses values out of range. Nothing is written besides ``out`` (no
run folder, no log file); the benchmark has no sweeps.

Per model (random weights in its exact shapes, built on the GPU), batch size and method: the engine's decode step
captured in a CUDA graph (dense and gated alike), a prompt prefilled, then ``gen`` greedy tokens replayed back to
back, ``repeats`` times after ``warmup``; ms/token is the median (a step yields one token per sequence). HF generate
runs on the same weights. Prints a table and appends rows (docs/design.md benchmark.jsonl schema) to ``out``.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import hydra
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, DictConfig, OmegaConf

from shadowsparse.errors import ConfigError

# method -> engine settings; "hf-*" are transformers' generate on the same weights
METHODS = {
    "dense": dict(),
    "dense/kernels": dict(all_kernels=True),  # every unit through the gathered Triton kernels (no cuBLAS)
    "ffn50": dict(ffn_sparsity=0.5),
    "ffn70": dict(ffn_sparsity=0.7),
    "heads50": dict(head_sparsity=0.5),
    "ffn50+heads50": dict(ffn_sparsity=0.5, head_sparsity=0.5),
    "ffn50+heads50/union": dict(ffn_sparsity=0.5, head_sparsity=0.5, batch_set="union"),
    # head gating uses lazy K/V where it is exact and cheaper (engine.py); "/kv-dense" keeps every head's K/V
    "heads50/kv-dense": dict(head_sparsity=0.5, kv="dense"),
    "ffn50+heads50/kv-dense": dict(ffn_sparsity=0.5, head_sparsity=0.5, kv="dense"),
    "predictor+ffn50+heads50": dict(ffn_sparsity=0.5, head_sparsity=0.5, predictor=True),
    # the sketch selector (runtime/ffn_select.py): a packed 3- (2-) bit copy of W_gate/W_up scores each gated
    # layer's neurons from its own FFN input, then the gathered FFN kernels read the kept rows
    "sketch+ffn50": dict(ffn_sparsity=0.5, sketch=3),
    "sketch2+ffn50": dict(ffn_sparsity=0.5, sketch=2),
    "sketch+ffn50+heads50": dict(ffn_sparsity=0.5, head_sparsity=0.5, sketch=3),
    # sketch_threshold: the same copy's estimates against per-layer thresholds (quantiles of the estimates on the
    # calibration prompts), no top-k; the gate/up kernel reads the rows that pass, the down GEMV the nonzero a's
    "sketch_thr+ffn50": dict(ffn_sparsity=0.5, sketch=3, threshold_sketch=True),
    "sketch_thr+ffn50+teal40attn": dict(ffn_sparsity=0.5, sketch=3, threshold_sketch=True, teal_attn=0.4),
    # "sketch8": the same codes scored with int8 x and dp4a (kernels/sketch_x8.py) instead of fp32 FFMAs
    "sketch8+ffn50": dict(ffn_sparsity=0.5, sketch=3, sketch_x=8),
    "sketch8_thr+ffn50": dict(ffn_sparsity=0.5, sketch=3, sketch_x=8, threshold_sketch=True),
    "sketch8_thr+ffn50+teal40attn": dict(ffn_sparsity=0.5, sketch=3, sketch_x=8, threshold_sketch=True,
                                         teal_attn=0.4),
    # input thresholds (runtime/input_sparsity.py, kernels/sparse_input.py): TEAL's per-layer quantiles of |x|,
    # calibrated on random prompts through the model; each projection reads only the rows of its kept channels
    "teal40": dict(teal=0.4),
    "teal50": dict(teal=0.5),
    "threshold+ffn50": dict(threshold=0.5),  # |a| at the down projection: gate/up dense, down rows skipped
    # "/dense-gemm": every step zeroes the thresholded inputs where they are made and runs the dense GEMMs (what
    # steps of more than EngineConfig.sparse_input_tokens rows do): the exact semantics at the dense GEMM's speed
    "teal40/dense-gemm": dict(teal=0.4, sparse_input_tokens=0),
    "teal50/dense-gemm": dict(teal=0.5, sparse_input_tokens=0),
    "threshold+ffn50/dense-gemm": dict(threshold=0.5, sparse_input_tokens=0),
    "sketch+ffn50+teal40attn": dict(ffn_sparsity=0.5, sketch=3, teal_attn=0.4),  # a sketch FFN, teal attention
    # gate (CATS): the gate projection in full scores the neurons; propose-then-verify: the proposer's top 60% are
    # candidates, their gate/up rows give the true |a|, each token keeps its top 50% (runtime/ffn_select.py)
    "gate+ffn50": dict(ffn_sparsity=0.5, gate=True),
    "gate_verify+ffn50": dict(ffn_sparsity=0.5, gate=True, verify=0.6),
    "sketch_verify+ffn50": dict(ffn_sparsity=0.5, sketch=3, verify=0.6),
    "2:4": dict(nm24=True),  # FFN weights 2:4-compressed (attention projections dense)
    "2:4+ffn50": dict(nm24=True, ffn_sparsity=0.5),
    "2:4+ffn50+heads50": dict(nm24=True, ffn_sparsity=0.5, head_sparsity=0.5),
    "hf-eager": dict(hf="dynamic"),
    "hf-static": dict(hf="static"),
    # transformers' own compile path: the static cache with generate's automatic torch.compile of the decode forward
    # (inductor, mode reduce-overhead: CUDA graphs); the first, untimed generate compiles
    "hf-compile": dict(hf="compile"),
}


# typing.List / Optional rather than list[int] / int | None: OmegaConf reads these annotations to type the nodes
@dataclass
class BenchConfig:
    """The keys of conf/bench/*.yaml and their types. The values, and what each key means, are in
    conf/bench/default.yaml (one place: the schema holds no second copy of the defaults)."""
    models: List[str] = MISSING
    batches: List[int] = MISSING
    prompt: int = MISSING
    gen: int = MISSING
    prefill_steps: List[int] = MISSING
    repeats: int = MISSING
    warmup: int = MISSING
    hf_repeats: int = MISSING
    dtype: str = MISSING
    methods: List[str] = MISSING
    batch_set: str = MISSING
    feature_layer: int = MISSING
    predictor_hidden: int = MISSING
    predictor_rank: int = MISSING
    layers: Optional[int] = None
    out: Optional[str] = None


@dataclass
class BenchmarkConfig:
    """conf/benchmark.yaml's schema: the bench node (the hydra node is Hydra's own)."""
    bench: BenchConfig = field(default_factory=BenchConfig)


ConfigStore.instance().store(name="benchmark_schema", node=BenchmarkConfig)


def check(bench: DictConfig) -> None:
    """Refuse values of the right type but out of range (the types are the schema's), before any model is built.
    Raises ConfigError naming the key and what it accepts."""
    bad = [m for m in bench.methods if m not in METHODS]
    if bad:
        raise ConfigError(f"unknown methods {bad}; choose from {sorted(METHODS)}")
    if any(not 1 <= b <= 8 for b in bench.batches):
        raise ConfigError(f"batches must be in 1..8 (the engine's decode batch), got {list(bench.batches)}")
    if any(not (isinstance(st, int) and 1 <= st <= 64) for st in bench.prefill_steps):
        raise ConfigError(f"prefill_steps must be integers in 1..64 (tokens per sequence per prefill step), got "
                          f"{list(bench.prefill_steps)}")
    if bench.layers is not None and bench.layers < 1:
        raise ConfigError(f"layers must be >= 1 (the first N decoder layers of each model) or null, got {bench.layers}")
    if bench.gen < 2:
        raise ConfigError("gen must be >= 2 (HF generate's per-token time is (t(gen) - t(1)) / (gen - 1))")


def hf_ms_per_token(model, prompt, gen: int, cache: str, repeats: int) -> list[float]:
    """transformers' generate on the same weights: (t(gen tokens) - t(1 token)) / (gen - 1), i.e. without prefill."""
    kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    if cache == "static":  # the static cache without torch.compile (compiling a 13B graph takes minutes)
        kw.update(cache_implementation="static", disable_compile=True)
    elif cache == "compile":  # the same cache, generate compiling its decode step (compile_config's defaults)
        kw.update(cache_implementation="static")

    def run(n):
        return lambda: model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kw)

    from shadowsparse.runtime.bench import time_host
    t1 = statistics.median(time_host(run(1), repeats))
    return [(t - t1) / (gen - 1) for t in time_host(run(gen), repeats)]


def engine_rows(name, model, weights, batch, cfg, bw, card, env) -> list[dict]:
    """Every method of cfg["methods"] at one batch size -> its benchmark.jsonl rows, speedups filled in."""
    from shadowsparse.progress import progress

    P, gen = cfg["prompt"], cfg["gen"]
    # one generator per batch size: the prompt, then each gated method's random scores, in method order
    g = torch.Generator(device="cuda").manual_seed(batch)
    prompt = torch.randint(0, weights.vocab, (batch, P), device="cuda", generator=g)  # (B, P)
    rows, calib = [], {}
    bar = progress(cfg["methods"], desc=f"{name} batch {batch}", unit="method")
    for method in bar:
        bar.set_postfix_str(method)  # HF generate on a 13B model takes minutes: the ETA says how many
        spec = dict(METHODS[method])
        base = dict(model=name, card=card, dtype=cfg["dtype"], batch=batch, prompt_len=P, gen_len=gen,
                    method=method, weights="random, exact shapes", layers=weights.n_layers, **env)
        if cfg["layers"] is not None:
            base["weights"] = f"random, exact shapes, the first {weights.n_layers} decoder layers only"
        if weights.experts and ({"gate", "nm24", "teal", "teal_attn", "threshold", "threshold_sketch", "verify"}
                                & set(spec)):
            print(f"{name}: {method} skipped (the benchmark times MoE layers with given, predicted or sketch scores)",
                  file=sys.stderr)
            continue
        if ({"sketch", "teal", "teal_attn", "threshold"} & set(spec)) and "teal" not in calib:
            calib["teal"] = teal_calibration(model, weights, cfg)  # once per model, on the first method needing it
        if "sketch" in spec and weights.family not in SWIGLU:  # the sketch reads a gate: SwiGLU FFNs only
            print(f"{name}: {method} skipped (the sketch needs a gated FFN)", file=sys.stderr)
            continue
        if "hf" in spec:
            times = hf_ms_per_token(model, prompt, gen, spec["hf"], cfg["hf_repeats"])
            rows.append(dict(base, ffn_sparsity=0.0, head_sparsity=0.0, ms_per_token=statistics.median(times),
                             ms_repeats=times))
        else:
            rows.append(engine_row(base, model, weights, prompt, spec, cfg, bw, g, calib.get("teal")))
    add_speedups(rows)
    return rows


def engine_row(base: dict, model, weights, prompt, spec: dict, cfg, bw: float, g: torch.Generator,
               teal=None) -> dict:
    """One engine method (spec: METHODS' settings) on prompt (B, P): its decode step captured in a CUDA graph and
    timed, the prompt's prefill timed, the bytes a step reads; dense also checks its logits against the model's,
    predictor methods time the predictor + top-k alone; input thresholds (teal: TealThresholds of the model)
    report the realized sparsity of each input on the prompt."""
    from shadowsparse import PredictorConfig, SharedPredictor
    from shadowsparse.runtime import DecodeEngine, EngineConfig, GraphedDecoder
    from shadowsparse.runtime.bench import step_bytes, time_replays

    w, gen = weights, cfg["gen"]
    batch, P = prompt.shape
    predictor = None
    if spec.pop("predictor", False):
        torch.manual_seed(0)
        predictor = SharedPredictor(w.hidden, w.n_layers, w.n_heads, w.ffn, cfg["feature_layer"],
                                    PredictorConfig(hidden=cfg["predictor_hidden"], rank=cfg["predictor_rank"]))
    sketch_bits, gate, verify_q = spec.pop("sketch", None), spec.pop("gate", False), spec.pop("verify", None)
    thresholded, sketch_x = spec.pop("threshold_sketch", False), spec.pop("sketch_x", None)
    inputs = input_thresholds(spec, teal, w)
    ecfg = EngineConfig(**{"batch_set": cfg["batch_set"], **spec})
    ffn_selector = ffn_selector_of(w, sketch_bits, gate, verify_q, ecfg.first_layer or 0, sketch_x)
    if thresholded:
        ffn_selector = threshold_sketch(model, w, ffn_selector, ecfg.ffn_sparsity, cfg)
    engine = DecodeEngine(w, batch, max_len=P + gen + 8, config=ecfg, predictor=predictor, ffn_selector=ffn_selector,
                          input_sparsity=inputs)
    heads = neurons = None
    if engine.gated and predictor is None and engine._needs_scores():  # given scores (random sets); the top-k
        # still runs in every step
        heads = torch.randn(batch, 1, w.n_layers, w.n_heads, device="cuda", generator=g)  # (B, 1, L, H)
        neurons = torch.randn(batch, 1, w.n_layers, w.ffn, device="cuda", generator=g)  # (B, 1, L, F)
        if ffn_selector is not None:  # the sketch scores the neurons itself, from each layer's input
            neurons = None
    graph = GraphedDecoder(engine, heads=heads, neurons=neurons)
    logits = engine.prefill(prompt, **prompt_scores(heads, neurons, P))
    first = logits[:, -1:].argmax(-1)  # (B, 1)
    prefill_ms = prefill_times(engine, prompt, heads, neurons, cfg)
    times = time_replays(graph.graph.replay, gen, cfg["repeats"], cfg["warmup"], lambda: graph.start(first, P))
    ms = statistics.median(times)
    kept = realized_inputs(engine, prompt) if inputs is not None else None
    nbytes = step_bytes(engine, 1, P + gen / 2, kept)
    row = dict(base, ffn_sparsity=ecfg.ffn_sparsity, head_sparsity=ecfg.head_sparsity,
               nm="2:4 ffn" if ecfg.nm24 else None,
               batch_set=ecfg.batch_set if batch > 1 and engine.gated else None,
               rows_read_per_layer=engine.rows_read(batch), first_gated_layer=engine.first_layer if engine.gated
               else None, ms_per_token=ms, ms_repeats=times, bytes_per_token=nbytes,
               gb_per_s=nbytes / ms / 1e6, copy_gb_per_s=bw, frac_copy_bw=nbytes / ms / 1e6 / bw,
               floor_ms=nbytes / bw / 1e6, prefill_ms=prefill_ms)
    if base["method"] == "dense":
        with torch.no_grad():  # the engine computes the model: its prompt logits against transformers'
            ref = model(prompt[:, :16]).logits.float()
            own = engine.prefill(prompt[:, :16]).float()
        row["logits_rel_err_vs_hf"] = ((own - ref).norm() / ref.norm()).item()
    if predictor is not None:
        row.update(predictor_timing(engine, cfg, ms))
    if ffn_selector is not None and w.experts:  # the MoE step scores its routed experts only: no stand-alone timing
        row.update(selector=ffn_selector.name, sketch_bits=sketch_bits, selector_bytes=ffn_selector.nbytes(),
                   sketch_scoring="routed experts" if engine.sketch_reads_routed(batch * w.experts_per_token)
                   else "all experts")
    elif ffn_selector is not None:
        row.update(selector_timing(engine, cfg, ms, sketch_bits), selector=ffn_selector.name, verify_q=verify_q,
                   sketch_x="int8 (dp4a)" if sketch_x == 8 else "fp32" if sketch_bits else None)
    if thresholded:  # the realized sparsity varies per token: counted by the kernels over the prompt's tokens
        row.update(realized_ffn_sparsity=realized_neurons(engine, prompt),
                   bytes_note="FFN rows counted at the requested sparsity; realized_ffn_sparsity is the prompt's")
    if inputs is not None:
        row.update(selector=inputs.label, input_thresholds=list(inputs.inputs), input_sparsity=spec_level(base),
                   **{f"realized_{n}_sparsity": 1 - f for n, f in kept.items()},
                   input_sparsity_bytes=engine.input_sparsity_bytes(),
                   bytes_note="thresholded weights counted at the prompt's per-token kept fraction; a batch reads "
                              "the union of its tokens' channels (more)" if batch > 1 else None)
    del graph, engine, logits
    torch.cuda.empty_cache()
    return row


def teal_calibration(model, w, cfg):
    """TEAL's calibration magnitudes of the random-weight model on 4 random prompts of cfg["prompt"] tokens (the
    thresholds then realize about the requested sparsity on the benchmark's own random prompts)."""
    from shadowsparse.teal import TealThresholds
    g = torch.Generator(device="cuda").manual_seed(1234)
    windows = torch.randint(0, w.vocab, (4, cfg["prompt"]), device="cuda", generator=g)
    return TealThresholds.calibrate(model, windows)


def input_thresholds(spec: dict, teal, w):
    """The InputSparsity of a method with input thresholds (popped from spec), or None."""
    from shadowsparse.runtime.input_sparsity import INPUTS, InputSparsity
    for key, inputs in (("teal", INPUTS), ("teal_attn", ("attn_in", "attn_out")), ("threshold", ("ffn_out",))):
        if key in spec:
            level = spec.pop(key)
            sp = InputSparsity.from_teal(teal, level, w.n_layers, spec.get("first_layer") or 0, inputs)
            sp.label = "threshold" if key == "threshold" else "teal"
            return sp
    return None


def spec_level(base: dict) -> float:
    """The input sparsity a method asks for, read from METHODS."""
    spec = METHODS[base["method"]]
    return spec.get("teal", spec.get("teal_attn", spec.get("threshold", 0.0)))


def threshold_sketch(model, w, sketch, sparsity: float, cfg):
    """sketch_threshold's engine selector: the sketch's estimates on the FFN inputs of the calibration prompts (the
    teal calibration's 4 random prompts through the model), each gated layer's threshold their sparsity-quantile."""
    from shadowsparse.arch import ModelView
    from shadowsparse.ffn_io import ffn_input_module
    from shadowsparse.runtime.ffn_select import SketchThresholdFFNSelector
    from shadowsparse.training_free import magnitude_quantile, sample_magnitudes
    view, rng = ModelView(model), torch.Generator().manual_seed(0)
    samples = {layer: [] for layer in sketch.sketches}

    def record(layer):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])  # (B·T, d) the FFN input
            samples[layer].append(sample_magnitudes(sketch.scores(layer, x), rng))
        return hook
    hooks = [ffn_input_module(view, layer).register_forward_pre_hook(record(layer)) for layer in samples]
    g = torch.Generator(device="cuda").manual_seed(1234)  # teal_calibration's prompts
    windows = torch.randint(0, w.vocab, (4, cfg["prompt"]), device="cuda", generator=g)
    try:
        with torch.no_grad():
            for i in range(len(windows)):
                model(windows[i:i + 1])
    finally:
        for h in hooks:
            h.remove()
    thr = torch.zeros(w.n_layers)
    for layer, parts in samples.items():
        thr[layer] = magnitude_quantile(torch.cat(parts), sparsity)
    return SketchThresholdFFNSelector(sketch, thr)


def realized_neurons(engine, prompt) -> float:
    """sketch_threshold: the realized FFN sparsity over the prompt's tokens (B·P), counted by the kernels."""
    sel = engine.ffn_selector
    sel.reset_counts()
    engine.prefill(prompt)
    gated, tokens = engine.w.n_layers - engine.first_layer, prompt.numel()
    return 1 - sum(sel.kept_per_layer()[engine.first_layer:]) / (tokens * gated * engine.w.ffn)


def realized_inputs(engine, prompt) -> dict:
    """Kept fraction per thresholded input over the prompt's tokens (B·P), counted by the kernels."""
    engine.reset_counts()
    engine.prefill(prompt)
    kept = engine.teal.kept_per_input(engine.first_layer)
    gated, tokens, widths = engine.w.n_layers - engine.first_layer, prompt.numel(), engine.input_widths()
    from shadowsparse.runtime.input_sparsity import INPUTS
    return {n: kept[INPUTS.index(n)] / (tokens * gated * widths[n]) for n in engine.teal.inputs}


def prompt_scores(heads, neurons, P: int) -> dict:
    """The given scores (B, 1, L, U) or None, as prefill's keywords for a P-token prompt: (B, P, L, U) views."""
    return dict(heads=None if heads is None else heads.expand(-1, P, -1, -1),
                neurons=None if neurons is None else neurons.expand(-1, P, -1, -1))


def prefill_times(engine, prompt, heads, neurons, cfg) -> dict:
    """Wall ms (median) of prefilling the prompt (B, P) in steps of each of cfg["prefill_steps"] tokens per
    sequence: the gathered kernels (B·st <= 16 rows) or the masked GEMMs (more) -> {"step<st>": ms}."""
    from shadowsparse.runtime.bench import time_host
    P = prompt.shape[1]
    out = {}
    for st in cfg["prefill_steps"]:
        pt = time_host(lambda: engine.prefill(prompt, **prompt_scores(heads, neurons, P), step_tokens=st),
                       cfg["repeats"])
        out[f"step{st}"] = statistics.median(pt)
    return out


def predictor_timing(engine, cfg, ms: float) -> dict:
    """The predictor + top-k alone, captured in a CUDA graph and timed as the step is; ms: the whole step's."""
    from shadowsparse.runtime.bench import time_replays
    x = torch.randn(engine.batch, 1, engine.w.hidden, device="cuda", dtype=engine.dtype)  # (B, 1, d)
    pg = torch.cuda.CUDAGraph()
    engine.select(*engine.predictor(x))
    torch.cuda.synchronize()
    with torch.cuda.graph(pg):
        engine.select(*engine.predictor(x))
    pt = statistics.median(time_replays(pg.replay, cfg["gen"], cfg["repeats"], cfg["warmup"]))
    return dict(predictor_ms=pt, predictor_share=pt / ms,
                predictor_params=sum(p.numel() for p in engine.predictor.parameters()))


SWIGLU = ("llama",)  # weights.family of the shapes whose FFN the sketch reads: every gated-FFN family the engine
# serves (Llama, Mistral, Qwen2/3, Gemma, Phi-3, Mixtral, Qwen3-MoE) is "llama" there; OPT's is not


def sketch_selector(w, bits: int, first_layer: int, x_bits: int | None = None):
    """Packed sketches of every gated layer's W_gate and W_up (midrise, no calibration: the speed depends on the
    shapes, not the values); x_bits 8: the int8-x layout (kernels/sketch_x8.py)."""
    from shadowsparse.kernels.sketch import sketch_from_weights
    from shadowsparse.kernels.sketch_x8 import sketch_from_weights_x8
    from shadowsparse.runtime.ffn_select import SketchFFNSelector
    if w.family not in SWIGLU:
        raise ConfigError("the sketch methods need a gated (SwiGLU) FFN: use a Llama-family or MoE shape, not OPT")

    def gate_up(layer):  # (F, d) each; an MoE layer's w_in is its (E*2F, d) gate_up_proj: every expert's gate rows
        lw = w.layers[layer]
        if not w.experts:
            return lw.w_in, lw.w_up
        per = lw.w_in.view(w.experts, 2, w.ffn // w.experts, w.hidden)
        return per[:, 0].reshape(w.ffn, w.hidden), per[:, 1].reshape(w.ffn, w.hidden)
    make = sketch_from_weights_x8 if x_bits == 8 else sketch_from_weights
    return SketchFFNSelector({layer: make(*gate_up(layer), bits) for layer in range(first_layer, w.n_layers)},
                             act=w.act)


def ffn_selector_of(w, sketch_bits: int | None, gate: bool, verify_q: float | None, first_layer: int,
                    sketch_x: int | None = None):
    """The per-layer FFN selector of a method: the sketch, the real gate (CATS), either verified by |a| (verify_q:
    the candidates' fraction), or None."""
    from shadowsparse.runtime.ffn_select import GateFFNSelector, VerifyFFNSelector
    if not sketch_bits and not gate:
        return None
    if gate:
        if w.family != "llama":
            raise ConfigError("the gate methods need a gated (SwiGLU) FFN: use a Llama-family shape")
        proposer = GateFFNSelector({layer: w.layers[layer].w_in for layer in range(first_layer, w.n_layers)}, w.act)
    else:
        proposer = sketch_selector(w, sketch_bits, first_layer, sketch_x)
    return proposer if verify_q is None else VerifyFFNSelector(proposer, verify_q)


def selector_timing(engine, cfg, ms: float, bits: int) -> dict:
    """The FFN selector's scoring + top-k of every gated layer alone (the sketch's, the gate's, or a verifier's
    proposer with its candidates), captured in a CUDA graph and timed as the step is; its extra bytes (the packed
    copies); ms: the whole step's."""
    from shadowsparse.runtime.bench import time_replays
    from shadowsparse.runtime.ffn_select import SketchThresholdFFNSelector
    from shadowsparse.runtime.select import select_units
    x = torch.randn(engine.batch, engine.w.hidden, device="cuda", dtype=engine.dtype)  # (B, d)
    # propose-then-verify: the proposer's scoring and top-k of the candidates (the verify stage is FFN work)
    sel = getattr(engine.ffn_selector, "proposer", engine.ffn_selector)
    k = engine.ffn_selector.k_candidates(engine.w.ffn, engine.k_ffn) if sel is not engine.ffn_selector \
        else engine.k_ffn

    def score_all():  # what the step runs: one token's own top k on the device, or the batch's sets
        for layer in range(engine.first_layer, engine.w.n_layers):
            if isinstance(sel, SketchThresholdFFNSelector):  # scores only: the threshold is the FFN kernel's
                sel.scores(layer, x)
            elif engine.batch == 1:
                sel.topk(layer, x, k)
            else:
                select_units(sel.scores(layer, x).unsqueeze(1), k, engine.cfg.batch_set)
    score_all()
    torch.cuda.synchronize()
    sg = torch.cuda.CUDAGraph()
    with torch.cuda.graph(sg):
        score_all()
    st = statistics.median(time_replays(sg.replay, cfg["gen"], cfg["repeats"], cfg["warmup"]))
    return dict(selector=sel.name, sketch_bits=bits, selector_ms=st, selector_share=st / ms,
                selector_bytes=sel.nbytes())


def add_speedups(rows: list[dict]) -> None:
    """The speedup columns of one batch size's rows, in place: against own dense, the best dense, HF eager."""
    dense_ms = hf_ms = None
    for row in rows:  # the last row of a method listed twice wins
        if row["method"] == "dense":
            dense_ms = row["ms_per_token"]
        elif row["method"] == "hf-eager":
            hf_ms = row["ms_per_token"]
    # the fairest baseline is the fastest dense: our two engines (cuBLAS, or every unit through our kernels) and
    # transformers' compiled static-cache generate, the dense a user would reach for
    best_dense = min([r["ms_per_token"] for r in rows if r["method"] in ("dense", "dense/kernels", "hf-compile")],
                     default=None)
    for row in rows:
        row["baseline"] = "own dense (CUDA graph)"
        row["speedup"] = dense_ms / row["ms_per_token"] if dense_ms else None
        row["speedup_vs_best_dense"] = best_dense / row["ms_per_token"] if best_dense else None
        row["speedup_vs_hf_eager"] = hf_ms / row["ms_per_token"] if hf_ms else None


@hydra.main(version_base="1.3", config_path="conf", config_name="benchmark")
def main(hcfg: DictConfig) -> None:
    try:
        check(hcfg.bench)
    except ConfigError as exc:
        sys.exit(str(exc))
    cfg = OmegaConf.to_container(hcfg.bench, resolve=True)  # a plain dict from here on
    if not cfg["out"]:
        cfg["out"] = str(Path(os.environ.get("OUT", ".")) / "benchmark.jsonl")
    if not torch.cuda.is_available():
        sys.exit("benchmark.py needs a CUDA GPU (the kernels and CUDA graphs are what it measures)")
    import transformers

    from shadowsparse.llm import parse_dtype
    from shadowsparse.runtime import extract_weights
    from shadowsparse.runtime.bench import build_random_model, copy_bandwidth

    dtype = parse_dtype(cfg["dtype"])
    if dtype not in (torch.float16, torch.bfloat16):
        sys.exit(f"dtype must be float16 or bfloat16 on the GPU, got {cfg['dtype']}")
    card = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    env = dict(torch=torch.__version__, transformers=transformers.__version__,
               triton=__import__("triton").__version__, host=platform.node(), time=time.strftime("%Y-%m-%d %H:%M"))
    experiment = HydraConfig.get().runtime.choices.get("bench")
    print(f"{card}, torch {env['torch']}, transformers {env['transformers']}, triton {env['triton']}; "
          f"copy bandwidth {bw:.0f} GB/s; config {json.dumps(dict(experiment=experiment, **cfg))}", flush=True)
    Path(cfg["out"]).parent.mkdir(parents=True, exist_ok=True)
    all_rows = []
    for name in cfg["models"]:
        t0 = time.perf_counter()
        model = build_random_model(name, dtype, layers=cfg["layers"])
        weights = extract_weights(model)
        gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
        print(f"\n{name}: {gb:.2f} GB of weights, built and laid out in {time.perf_counter() - t0:.1f} s", flush=True)
        for batch in cfg["batches"]:
            rows = engine_rows(name, model, weights, batch, cfg, bw, card, env)
            with open(cfg["out"], "a") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
            for r in rows:
                print(_fmt(r), flush=True)
            all_rows += rows
        del model, weights
        torch.cuda.empty_cache()
    print(f"\n{card}, {cfg['dtype']}, prompt {cfg['prompt']}, {cfg['gen']} tokens; copy {bw:.0f} GB/s")
    print(f"{'model':<13}{'B':>2} {'method':<24}{'ms/tok':>8}{'GB/s':>7}{'%copy':>6}{'x dense':>8}{'x best':>7}"
          f"{'x HF':>6}{'pred%':>6}")
    for r in all_rows:
        print(_fmt(r))


def _fmt(r: dict) -> str:
    f = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
    return (f"{r['model']:<13}{r['batch']:>2} {r['method']:<24}{r['ms_per_token']:>8.3f}{f(r.get('gb_per_s'), '7.0f')}"
            f"{f(r.get('frac_copy_bw') and 100 * r['frac_copy_bw'], '6.1f')}{f(r.get('speedup'), '8.2f')}"
            f"{f(r.get('speedup_vs_best_dense'), '7.2f')}"
            f"{f(r.get('speedup_vs_hf_eager'), '6.2f')}"
            f"{f(r.get('predictor_share') and 100 * r['predictor_share'], '6.2f')}")


if __name__ == "__main__":
    main()

"""Gated generation for users: a finished run (or a model plus a training-free method) -> text, with any registered
selector choosing the heads and FFN neurons per token.

    import shadowsparse as ss
    g = ss.load_gated("outputs/runs/<run>", method="sketch", ffn_sparsity=0.5)
    g.generate(["The capital of France is", "def fib(n):"], max_new_tokens=64, temperature=0.7, top_p=0.9, seed=0)
    for piece in g.stream("Tell me a story", max_new_tokens=128): print(piece, end="")
    g.perplexity(windows)    # (B, T) token ids or a text, through the same path that generates
    g.stats()                # realized sparsity, tokens/s of the last call

The selector comes from the evaluation's registry (shadowsparse/selectors/), built exactly as the evaluation builds
it, so a generated token saw the same masks as the rows of results.jsonl. Two paths behind one interface:
  engine="kernels"  the decode engine (shadowsparse/runtime): the unselected heads and neurons are not read (Triton
                    kernels on CUDA, their torch fallbacks elsewhere), decode steps replayed from a CUDA graph on GPUs;
  engine="hooks"    the mask path (shadowsparse/gating.py hooks on the Hugging Face model): every weight is still
                    read; the reference the engine is tested against;
  engine="auto"     the engine where the selector has an engine path (Selector.engine_parts) and the model family is
                    one the engine supports, else the hooks (the reason is logged).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Iterator

import torch
from omegaconf import OmegaConf

from .arch import ModelView
from .errors import ConfigError
from .decoders import EngineDecoder, HooksDecoder
from .gating import GatingConfig
from .llm import LLMConfig, load_llm, max_context
from .sampling import SamplingConfig, cut_at_stop, next_tokens

log = logging.getLogger("shadowsparse")
ENGINES = ("auto", "kernels", "hooks")


class GatedLM:
    """A model whose selector skips heads and FFN neurons per token; generate / stream / perplexity / stats."""

    def __init__(self, model, tokenizer, decoder: HooksDecoder | EngineDecoder, method: str,
                 gating: GatingConfig | None, engine: str):
        self.model, self.tok, self.decoder = model, tokenizer, decoder
        self.method, self.gating, self.engine = method, gating, engine
        self.view = ModelView(model)
        self.context = max_context(model)
        self.last = {}  # tokens and seconds of the last generate / stream call

    # -- text in, text out ---------------------------------------------------------------------------------------
    def generate(self, prompts: str | list[str], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop: list[str] | None = None,
                 chat: bool = False) -> list[str] | str:
        """The continuation of each prompt (a str for a str). Greedy at temperature 0; stops at EOS, a stop string
        (cut before it) or max_new_tokens."""
        single = isinstance(prompts, str)
        texts = [""] * (1 if single else len(prompts))
        for i, piece in self._decode([prompts] if single else list(prompts), SamplingConfig(
                max_new_tokens, temperature, top_p, top_k, seed, list(stop or [])).validate(), chat):
            texts[i] += piece
        return texts[0] if single else texts

    def stream(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int | None = None, stop: list[str] | None = None,
               chat: bool = False) -> Iterator[str]:
        """The continuation of one prompt, piece by piece as it is generated."""
        cfg = SamplingConfig(max_new_tokens, temperature, top_p, top_k, seed, list(stop or [])).validate()
        for _, piece in self._decode([prompt], cfg, chat):
            yield piece

    def _encode(self, prompts: list[str], chat: bool, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        if chat:
            if not getattr(self.tok, "chat_template", None):
                raise ConfigError("chat=True but the tokenizer has no chat template; pass chat=False (plain text)")
            prompts = [self.tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                    add_generation_prompt=True) for p in prompts]
        rows = [self.tok(p, add_special_tokens=not chat)["input_ids"] for p in prompts]
        if not all(rows):
            raise ConfigError("an empty prompt has no token to continue from; give every prompt some text")
        longest = max(len(r) for r in rows)
        if longest + new_tokens > self.context:
            raise ConfigError(f"a prompt of {longest} tokens plus max_new_tokens={new_tokens} exceeds the model's "
                              f"context of {self.context} tokens; shorten the prompt or lower max_new_tokens")
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (longest - len(r)) + r for r in rows])  # (B, P), padded on the left
        attn = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows])
        return ids, attn

    def _decode(self, prompts: list[str], cfg: SamplingConfig, chat: bool) -> Iterator[tuple[int, str]]:
        """(prompt index, new text) pieces as tokens are generated; text is cut before a stop string. A decoder
        that takes no padding (the engine) gets the prompts of each token length together."""
        ids, attn = self._encode(prompts, chat, cfg.max_new_tokens)
        gen = torch.Generator(self.decoder.device).manual_seed(cfg.seed) if cfg.seed is not None else None
        t0, self.last = time.perf_counter(), {"new_tokens": 0}
        lengths = attn.sum(-1)
        groups = [list(range(len(prompts)))] if self.decoder.pads else \
            [[i for i in range(len(prompts)) if lengths[i] == n] for n in sorted(set(lengths.tolist()))]
        for group in groups:
            width = int(lengths[group].max())
            for i, piece in self._decode_batch(ids[group, -width:], attn[group, -width:], cfg, gen):
                yield group[i], piece
        self.last["seconds"] = time.perf_counter() - t0

    def _decode_batch(self, ids, attn, cfg: SamplingConfig, gen) -> Iterator[tuple[int, str]]:
        eos = self.tok.eos_token_id
        B = ids.shape[0]
        tokens: list[list[int]] = [[] for _ in range(B)]
        shown, done = [""] * B, [False] * B
        with self.decoder.attached():
            logits = self.decoder.start(ids, attn, cfg.max_new_tokens)
            for step in range(cfg.max_new_tokens):
                nxt = next_tokens(logits, cfg, gen)  # (B,)
                for i, t in enumerate(nxt.tolist()):
                    if done[i]:
                        continue
                    if t == eos:
                        done[i] = True
                        continue
                    tokens[i].append(t)
                    self.last["new_tokens"] += 1
                    text, stopped = cut_at_stop(self.tok.decode(tokens[i], skip_special_tokens=True), cfg.stop)
                    done[i] = stopped
                    # hold back a tail that may still become a stop string
                    safe = text if stopped else text[:len(text) - max((len(s) - 1 for s in cfg.stop), default=0)]
                    if len(safe) > len(shown[i]) and safe.startswith(shown[i]):
                        yield i, safe[len(shown[i]):]
                        shown[i] = safe
                if all(done) or step == cfg.max_new_tokens - 1:
                    break
                logits = self.decoder.step(nxt)
        for i in range(B):  # what was held back for stop strings, once generation has ended without one
            text, _ = cut_at_stop(self.tok.decode(tokens[i], skip_special_tokens=True), cfg.stop)
            if len(text) > len(shown[i]) and text.startswith(shown[i]):
                yield i, text[len(shown[i]):]

    # -- evaluation through the same path ------------------------------------------------------------------------
    def perplexity(self, windows: torch.Tensor | str, seq_len: int = 512, token_by_token: bool = False) -> float:
        """Perplexity of (B, T) token windows, or of a text cut into windows of seq_len tokens, through the same
        gated path that generates (token_by_token: the engine decodes one position per step, as in generation;
        the hooks gate every token alike either way)."""
        if isinstance(windows, str):
            ids = torch.tensor(self.tok(windows)["input_ids"])
            seq_len = min(seq_len, self.context)
            if ids.numel() < seq_len:
                raise ConfigError(f"the text holds {ids.numel()} tokens, fewer than one window of {seq_len}; give "
                                  "a longer text or a smaller seq_len")
            windows = ids[: ids.numel() // seq_len * seq_len].view(-1, seq_len)
        if windows.dim() != 2 or windows.shape[1] < 2:
            raise ConfigError(f"windows must be (B, T) token ids with T >= 2, got shape {tuple(windows.shape)}")
        nll = sum(self.decoder.nll(w[None], token_by_token) for w in windows)
        return float(torch.tensor(nll / windows[:, 1:].numel()).exp())

    def stats(self) -> dict:
        """Realized sparsity over the gated layers (counted from the masks applied), and the last call's speed."""
        d = self.view.dims
        out = {"method": self.method, "engine": self.engine,
               "ffn_sparsity": self.gating.ffn_sparsity if self.gating else 0.0,
               "head_sparsity": self.gating.head_sparsity if self.gating else 0.0,
               **self.decoder.stats(d)}
        if self.last.get("seconds"):
            out.update(new_tokens=self.last["new_tokens"],
                       tokens_per_s=self.last["new_tokens"] / self.last["seconds"])
        return out


def load_gated(source, method: str = "predictor", ffn_sparsity: float = 0.5, head_sparsity: float = 0.0,
               device: str | None = None, engine: str = "auto", tokenizer=None, calib: torch.Tensor | None = None,
               overrides: list[str] | None = None, fallback: str | int = "measured") -> GatedLM:
    """A GatedLM from a train.py run directory (its model, config and artifacts: predictor checkpoint, targets) or
    from a model plus a training-free method (``tokenizer`` needed; ``calib`` (N, T) token ids of calibration text,
    else the default config's calibration text). ``overrides``: Hydra overrides of the run's config (e.g.
    ``["evaluate.verify.bits=2"]``). ``fallback`` (the engine only): "measured" runs a generation step dense where
    the selector's path was measured slower than dense at that many token rows (runtime/dispatch.py; stats() says
    how many tokens did), "never" gates every step, an int N runs steps of more than N rows dense; perplexity()
    always gates every token."""
    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {ENGINES}, got {engine!r}")
    from .runtime.dispatch import validate as validate_fallback
    validate_fallback(fallback)  # before the engine try below, which would read its error as "no engine here"
    cfg, model, tok, run_dir = _open(source, device, tokenizer, overrides or [])
    cfg.gating.ffn_sparsity, cfg.gating.head_sparsity = float(ffn_sparsity), float(head_sparsity)
    gating, gated_source, parts, attach = _selector_source(cfg, model, tok, run_dir, method, calib,
                                                           engine != "hooks")
    if isinstance(parts, dict):
        try:
            return GatedLM(model, tok, EngineDecoder(model, parts, gating, fallback=fallback), method, gating,
                           "kernels")
        except ConfigError as exc:  # a model family the engine does not serve
            parts = str(exc)
    if engine == "kernels":
        raise ConfigError(f"engine='kernels' cannot run {method} here: {parts}; use engine='hooks' (the mask path)")
    if engine == "auto":
        log.info("load_gated: %s runs on the mask path (hooks): %s", method, parts)
    return GatedLM(model, tok, HooksDecoder(model, gated_source, gating, attach), method, gating, "hooks")


def saved_run_config(saved: Path, overrides: list[str]):
    """A run's .hydra/config.yaml with ``overrides`` on top. Settings added to the package after the run was made
    keep the value the run used: a run from before evaluate.verify.x_bits scored its sketch with fp32 x."""
    base = OmegaConf.load(saved)
    verify = OmegaConf.select(base, "evaluate.verify")
    if verify is not None and "x_bits" not in verify:
        verify.x_bits = None
    return OmegaConf.merge(base, OmegaConf.from_dotlist(overrides))


def _open(source, device, tokenizer, overrides: list[str]):
    """(config, model, tokenizer, run directory) of a run directory or of a model given in memory."""
    if isinstance(source, (str, Path)):
        run_dir = Path(source)
        saved = run_dir / ".hydra" / "config.yaml"
        if not saved.exists():
            raise ConfigError(f"'{source}' is not a train.py run directory (no .hydra/config.yaml); give a run "
                              "directory, or a model with tokenizer= and a training-free method")
        cfg = saved_run_config(saved, overrides)
        llm = OmegaConf.to_container(cfg.llm, resolve=True)
        llm.update(seed=cfg.get("seed", 0), **({"device": device} if device else {}))
        model, tok = load_llm(LLMConfig(**llm))
        _run_static_mask(cfg, model, tok, run_dir)
        from .distill import load_run_distilled
        load_run_distilled(run_dir, model)  # a run made with stages.distill gates its fine-tuned model
        return cfg, model, tok, run_dir
    if tokenizer is None:
        raise ConfigError("load_gated(model, ...) needs tokenizer= (the model's tokenizer)")
    from hydra import compose, initialize_config_dir

    from .schema import register_schemas  # noqa: F401  (types conf/ groups, as train.py does)
    conf = Path(__file__).resolve().parent.parent / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["paths.output_dir=.", *overrides])
    if device:
        source = source.to(device)
    return cfg, source, tokenizer, None


def _run_static_mask(cfg, model, tok, run_dir: Path) -> None:
    """A run with a static mask (sparsity=...) collected its targets and fitted its selectors on the masked model:
    serve that model. The mask is recomputed as the run computed it (same calibration windows and seed), then
    squashed: E-Sparse's input gathers folded back into plain weights, which the decode engine reads."""
    from .pipeline import static_mask_
    from .prune import squash_
    if not cfg.get("sparsity") or cfg.sparsity.get("metric") is None:
        return
    log.info("load_gated: recomputing the run's static mask (%s %s) on %s", cfg.sparsity.metric,
             cfg.sparsity.get("pattern"), run_dir)
    report = static_mask_(cfg, model, tok)
    squash_(model)
    saved = run_dir / "sparsity.json"
    if saved.exists():  # the same mask as the run's, or say so
        want = json.loads(saved.read_text()).get("realized_weight_sparsity")
        if want is not None and abs(report["realized_weight_sparsity"] - want) > 1e-6:
            log.warning("load_gated: the recomputed static mask zeroes %.6f of the weights, the run's %.6f (another "
                        "device or library version?)", report["realized_weight_sparsity"], want)


def _selector_source(cfg, model, tok, run_dir, method: str, calib, engine: bool):
    """The registered selector, built as the evaluation builds it -> (GatingConfig, mask-path source, the decode
    engine's parts or why there are none, the selector's own hooks (Run.attach) or None)."""
    from .evaluate import collection_info
    from .pipeline import targets_dir_for
    from .selectors import EvalContext, get_selector
    from .selectors.base import CONFIG
    sel = get_selector(method)
    if sel.generates:
        raise ConfigError(f"load_gated cannot serve {method}: {sel.generates}; generate with another method (e.g. "
                          "predictor, sketch, sketch_threshold, sketch_verify, threshold, gate, static)")
    ctx = EvalContext(cfg=cfg, model=model, tok=tok, view=ModelView(model), run_dir=Path(run_dir or "."),
                      targets_dir=targets_dir_for(cfg, model), methods=[method], calib=calib)
    if sel.ffn_only and cfg.gating.head_sparsity:
        raise ConfigError(f"{method} has no head axis (FFN neurons only; teal: one sparsity for every input); use "
                          "head_sparsity=0 with it")
    sel.prepare(ctx)
    ctx.info = collection_info(ctx, [sel])
    ctx.first_layer = ctx.info["feature_layer"] + 1
    reason = sel.skip_reason(ctx)
    if reason:
        raise ConfigError(f"{method} cannot run here: {reason}")
    run = next(iter(sel.runs(ctx)))
    try:
        parts = sel.engine_parts(ctx, run) if engine else "engine='hooks' asked for"
    except ConfigError as exc:  # a family the engine does not serve (e.g. an activation it has no kernel for)
        parts = str(exc)
    if run.source is None and run.attach is None:  # the dense model
        return None, None, parts, None
    granularity = cfg.gating.granularity if run.granularity == CONFIG else (run.granularity or "token")
    budget = cfg.gating.budget if run.budget == CONFIG else (run.budget or "local")
    gating = GatingConfig(ffn_sparsity=cfg.gating.ffn_sparsity, head_sparsity=cfg.gating.head_sparsity,
                          granularity=granularity, first_layer=ctx.first_layer, budget=budget,
                          min_keep=cfg.gating.min_keep).validate()
    if isinstance(parts, dict) and (budget != "local" or granularity != "token"):
        parts = f"the decode engine gates per token with a local budget (got {granularity}, {budget})"
    return gating, run.source, parts, run.attach

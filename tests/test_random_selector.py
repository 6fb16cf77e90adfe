"""The `random` selector (the README's worked example of adding a selector): realized sparsity equals requested,
masks differ per token, rows appear in a pipeline run next to dense."""
import json

import torch

from shadowsparse.gating import GatingConfig, attach_gating
from shadowsparse.selectors.random import RandomScores
from tests.conftest import compose, tiny_model


def test_random_masks_differ_per_token_and_count_exactly():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with attach_gating(model, RandomScores(seed=0), GatingConfig(ffn_sparsity=0.5, head_sparsity=0.5,
                                                                 first_layer=0)) as h:
        seen = []
        h.view.ffn_down(0).register_forward_pre_hook(lambda m, a: seen.append(a[0] != 0))  # after the gating hook
        model(input_ids=ids)
        stats = h.stats()
    assert abs(stats["realized_ffn_sparsity"] - 0.5) < 1e-6 and abs(stats["realized_head_sparsity"] - 0.5) < 1e-6
    kept = seen[0].reshape(-1, seen[0].shape[-1])  # (tokens, F)
    assert not torch.equal(kept[0], kept[1])  # a different random choice per token


def test_random_rows_in_the_pipeline(tmp_path):
    from shadowsparse.pipeline import run
    run(compose("experiment=smoke", f"paths.output_dir={tmp_path}/run", f"paths.cache_dir={tmp_path}/cache",
                "stages.collect=false", "stages.fit=false", "evaluate.methods=[dense,random]"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    random_rows = [r for r in rows if r["method"] == "random"]
    dense = next(r["value"] for r in rows if r["method"] == "dense")
    assert len(random_rows) == 4 and all(r["value"] != dense for r in random_rows)  # the hooks did act
    assert all(r["weight_bytes_skipped"] > 0 and r["criterion"] is None for r in random_rows)

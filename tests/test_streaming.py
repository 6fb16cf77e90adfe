"""TargetsDataModule streams rows from memory-mapped shards: the same rows and normalized targets as loading every
shard into memory (the previous path), never all of them at once, split evenly over DDP ranks."""
import pytest
import torch

import shadowsparse.targets as T
from shadowsparse.system import StreamingRows, TargetsDataModule, normalize_scores
from shadowsparse.targets import TargetsConfig, collect, load_targets
from tests.conftest import tiny_model

N_WINDOWS, SEQ = 7, 16  # 112 rows in shards of 16 rows


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    out = tmp_path_factory.mktemp("streaming") / "t"
    model = tiny_model("llama")
    wins = torch.randint(0, 256, (N_WINDOWS, SEQ), generator=torch.Generator().manual_seed(5))
    collect(model, wins, TargetsConfig(criterion="plainact", shard_tokens=16), out)
    return out, model


def in_memory(targets_dir, model, input_key="features", normalize="layer"):
    """The previous DataModule's rows: every shard loaded, scores normalized in 1024-row chunks, kept in bf16."""
    _, t = load_targets(targets_dir, model, keys=(input_key, "heads", "neurons"))
    for key in ("heads", "neurons"):
        t[key] = normalize_scores(t[key], 1e-3, normalize).to(t[key].dtype)
    return t[input_key], t["heads"], t["neurons"]


def streamed(loader):
    batches = list(loader)
    return [torch.cat(c) for c in zip(*batches)], [b[0].shape[0] for b in batches]


def row_index(x_ref, x):
    """Position in x_ref of every row of x (feature rows are distinct floats: an exact match identifies a row)."""
    where = {r.float().numpy().tobytes(): i for i, r in enumerate(x_ref)}
    assert len(where) == len(x_ref)
    return torch.tensor([where[r.float().numpy().tobytes()] for r in x])


@pytest.mark.parametrize("input_key,normalize", [("features", "layer"), ("layer_inputs", "token")])
def test_streamed_rows_equal_the_in_memory_rows(targets, monkeypatch, input_key, normalize):
    out, model = targets
    x_ref, h_ref, n_ref = in_memory(out, model, input_key, normalize)
    n = x_ref.shape[0]
    monkeypatch.setattr(T, "load_targets", lambda *a, **k: pytest.fail("the DataModule loaded every shard"))
    # a shuffle buffer of 24 feature rows (64 * 4 bytes + 4 layers * (4 heads + 96 neurons) * 2 bytes each)
    dm = TargetsDataModule(str(out), batch_size=7, val_fraction=0.25, model=model, seed=0, input_key=input_key,
                           normalize=normalize, chunk_rows=5, buffer_bytes=24 * 1056, keep_bytes=0)
    dm.setup()
    cut = n - round(n * 0.25)
    (x, h, nn), sizes = streamed(dm.train_dataloader())
    assert sizes == [7] * (cut // 7) + ([cut % 7] if cut % 7 else []) and len(dm.train_dataloader()) == len(sizes)
    idx = row_index(x_ref, x)
    assert sorted(idx.tolist()) == list(range(cut))  # every training row once, no held-out row
    assert idx.tolist() != list(range(cut))  # shuffled
    torch.testing.assert_close(h.float(), h_ref[idx].float(), rtol=0, atol=0)
    torch.testing.assert_close(nn.float(), n_ref[idx].float(), rtol=0, atol=0)
    assert x.dtype == x_ref.dtype and nn.dtype == n_ref.dtype
    # held out: the last rows, in order
    (xv, hv, nv), _ = streamed(dm.val_dataloader())
    assert torch.equal(xv, x_ref[cut:]) and torch.equal(hv, h_ref[cut:]) and torch.equal(nv, n_ref[cut:])
    # never the whole training set in memory: at most one buffer (+ one chunk) of rows
    assert dm.train_set.peak_rows < dm.train_set.buffer_rows + 5 < cut
    # a second epoch: another order, the same rows
    (x2, _, _), _ = streamed(dm.train_dataloader())
    idx2 = row_index(x_ref, x2)
    assert sorted(idx2.tolist()) == list(range(cut)) and idx2.tolist() != idx.tolist()


def test_each_row_is_read_once_per_epoch_from_its_shard(targets):
    out, model = targets
    reader = T.TargetsReader(out, model)
    ds = StreamingRows(reader, 0, reader.n_rows, batch_size=8, input_key="features", eps=1e-3, normalize="layer",
                       shuffle=True, chunk_rows=6, buffer_rows=20)
    assert all(reader.shard_of(a) == reader.shard_of(b - 1) for a, b in ds.chunks)  # chunks never span shards
    list(ds)
    assert reader.rows_read == 3 * reader.n_rows  # features, heads, neurons: each row once
    assert ds.peak_rows <= 20 + 6 - 1
    assert len(reader._open) <= reader.MAX_OPEN


def test_kept_rows_serve_later_epochs_without_reading_the_shards(targets):
    """keep=True (a range inside the DataModule's keep_bytes): the first epoch reads and normalizes every row once,
    later epochs read nothing and serve exactly what a streaming dataset with the same seed serves."""
    out, model = targets
    kw = dict(batch_size=8, input_key="features", eps=1e-3, normalize="layer", shuffle=True, seed=3, chunk_rows=6,
              buffer_rows=20)
    kept_reader, stream_reader = T.TargetsReader(out, model), T.TargetsReader(out, model)
    kept = StreamingRows(kept_reader, 0, kept_reader.n_rows, keep=True, **kw)
    stream = StreamingRows(stream_reader, 0, stream_reader.n_rows, **kw)
    for epoch in range(3):
        a, b = list(kept), list(stream)
        assert len(a) == len(b) and all(torch.equal(u, v) for x, y in zip(a, b) for u, v in zip(x, y))
        assert kept_reader.rows_read == 3 * kept_reader.n_rows  # only the first epoch read the shards
        assert stream_reader.rows_read == 3 * stream_reader.n_rows * (epoch + 1)


def test_datamodule_keeps_small_ranges_only(targets):
    out, model = targets
    small = TargetsDataModule(str(out), batch_size=7, model=model)
    small.setup()
    big = TargetsDataModule(str(out), batch_size=7, model=model, keep_bytes=100)
    big.setup()
    assert small.train_set.kept is not None and big.train_set.kept is None


def test_ddp_ranks_stream_disjoint_equal_shares(targets, monkeypatch):
    out, model = targets
    reader = T.TargetsReader(out, model)
    x_ref = load_targets(out, model, keys=("features",))[1]["features"]
    n = reader.n_rows  # 112 rows, 3 ranks: 37 each, 1 left out per epoch
    shares = []
    for rank in range(3):
        monkeypatch.setattr(StreamingRows, "rank_world", staticmethod(lambda r=rank: (r, 3)))
        ds = StreamingRows(reader, 0, n, batch_size=10, input_key="features", eps=1e-3, normalize="layer",
                           shuffle=True, seed=1, chunk_rows=7, buffer_rows=16)
        (x, _, _), sizes = streamed(ds)
        assert len(ds) == len(sizes) == 4 and x.shape[0] == 37  # same batch count on every rank: DDP in lockstep
        shares.append(set(row_index(x_ref, x).tolist()))
    assert not (shares[0] & shares[1]) and not (shares[1] & shares[2]) and not (shares[0] & shares[2])
    assert len(shares[0] | shares[1] | shares[2]) == n - 1


def test_topk_targets_train_through_the_pipeline(tmp_path):
    """Top-k neuron targets decode at read time; training and the top-k recall metric run on them."""
    from shadowsparse.pipeline import run
    from tests.conftest import compose
    metrics = run(compose("experiment=smoke", "targets.neuron_topk=0.5", "gating.ffn_sparsity=0.5",
                          "stages.evaluate=false", "stages.report=false", "trainer.max_epochs=1",
                          f"paths.output_dir={tmp_path}/run", f"paths.targets_dir={tmp_path}/t"))
    assert T.read_manifest(tmp_path / "t")["neuron_encoding"] == "topk"
    assert 0.0 < metrics["val/recall_ffn"] <= 1.0 and metrics["val/loss"] == metrics["val/loss"]  # not NaN


def test_a_constant_score_row_normalizes_to_zero_whatever_the_batch():
    """A window's last token predicts nothing: gradient criteria give it all-zero scores. Its normalized targets are
    0 (no ranking to learn), the same alone or among other rows, not rounding noise scaled by 1e6."""
    s = torch.rand(5, 4, 96)
    s[2] = 0.0
    for over in ("layer", "token"):
        alone, among = normalize_scores(s[2:3], 1e-3, over), normalize_scores(s, 1e-3, over)
        assert torch.equal(alone[0], torch.zeros(4, 96)) and torch.equal(among[2], alone[0])
        assert among[0].std() > 0.5  # ordinary rows still standardized


@pytest.mark.parametrize("topk", [None, 0.25])
def test_mean_scores_stream_what_a_static_mask_ranks(tmp_path, topk):
    model = tiny_model("llama")
    wins = torch.randint(0, 256, (5, 16), generator=torch.Generator().manual_seed(7))
    out = collect(model, wins, TargetsConfig(criterion="activation", shard_tokens=16, neuron_topk=topk), tmp_path / "t")
    _, t = load_targets(out, model, keys=("heads", "neurons"))
    h, n = T.mean_scores(out, model, chunk_rows=6)  # chunks of 6 inside shards of 16 rows
    assert h.shape == (4, 4) and n.shape == (4, 96)
    torch.testing.assert_close(h, t["heads"].double().mean(0).float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(n, t["neurons"].double().mean(0).float(), rtol=1e-6, atol=0)

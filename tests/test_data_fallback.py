"""Without the datasets library (a GPU host that gets its packages as wheels), local files are read directly and
give the same text, so the same windows and targets, as through datasets."""
import sys

import pytest

from shadowsparse.data import TextSource, read_text
from shadowsparse.errors import ConfigError
from tests.conftest import compose

SOURCES = ["calib", "eval"]  # the shipped C4 sample (json lines) and WikiText-2 (text, whole document)


@pytest.mark.parametrize("which", SOURCES)
def test_local_files_read_the_same_without_datasets(which, monkeypatch):
    from omegaconf import OmegaConf
    node = compose().data[which].source
    src = TextSource(**OmegaConf.to_container(node, resolve=True), max_chars=200_000)
    with_datasets = read_text(src)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    assert read_text(src) == with_datasets


def test_text_lines_paragraphs_and_json_array_without_datasets(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    f = tmp_path / "t.txt"
    f.write_text("one\ntwo\n\nthree\n")
    assert read_text(TextSource(path="text", data_files=str(f), separator="|")) == "one|two|three"
    assert read_text(TextSource(path="text", data_files=str(f), sample_by="paragraph", separator="|")) == \
        "one\ntwo|three\n"
    j = tmp_path / "a.json"
    j.write_text('[{"body": "a"}, {"body": ""}, {"body": "b"}]')
    assert read_text(TextSource(path="json", data_files=str(j), text_field="body", separator=" ")) == "a b"
    with pytest.raises(ConfigError, match="no column 'text'"):
        read_text(TextSource(path="json", data_files=str(j)))
    with pytest.raises(ConfigError, match="needs the 'datasets' library"):
        read_text(TextSource(path="allenai/c4", name="en", split="validation"))
    with pytest.raises(ConfigError, match="does not exist"):
        read_text(TextSource(path="json", data_files=str(tmp_path / "missing.jsonl")))


@pytest.mark.parametrize("split", ["train[1000:]", "train[:1000]+train[1100:]", "train[10%:20%]", "train[-5:]"])
def test_local_split_selects_the_documents_datasets_would(split, monkeypatch):
    """A held-out screen (experiment=heldout_c4: split train[1000:]) reads the same documents without datasets;
    before, the split was ignored there and the screen scored the calibration text."""
    src = TextSource(path="json", data_files="data/c4_validation_sample/c4_validation_2k.jsonl", split=split,
                     max_chars=300_000)
    with_datasets = read_text(src)
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert read_text(src) == with_datasets
    if not split.startswith("train[:"):  # (the first 300,000 characters of the others are the whole file's)
        assert read_text(src) != read_text(TextSource(**{**src.__dict__, "split": "train"}))


def test_local_split_refuses_what_a_local_file_lacks(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    f = tmp_path / "t.txt"
    f.write_text("a\nb\nc\n")
    assert read_text(TextSource(path="text", data_files=str(f), split="train[1:]+train[:1]", separator="")) == "bca"
    for bad in ("validation", "train[1]", "train[a:b]"):
        with pytest.raises(ConfigError, match="split"):
            read_text(TextSource(path="text", data_files=str(f), split=bad))

"""Shipped task copies: reproducible from the shared data, prompts as lm-eval writes them."""
import json

import pytest

from shadowsparse.errors import ConfigError
from shadowsparse.tasks import TASKS, convert_all, task_config
from tests.conftest import ROOT

SHARED = ROOT.parent / "shared" / "data"


@pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/data")
def test_shipped_copies_are_the_conversion_of_the_shared_data(tmp_path):
    counts = convert_all(SHARED, tmp_path)
    assert counts == {"copa": 500, "arc_easy": 2376, "openbookqa": 500, "winogrande": 1267, "hellaswag": 2000,
                      "rte": 277, "boolq": 3270}
    for name in TASKS:
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (ROOT / "data" / "tasks" / f"{name}.jsonl").read_bytes()


def _first(name):
    return json.loads((ROOT / "data" / "tasks" / f"{name}.jsonl").open().readline())


def test_prompts_exact_values():
    assert _first("copa") == {"query": "My body cast a shadow over the grass because",
                              "choices": ["the sun was rising.", "the grass was cut."], "gold": 0}
    assert _first("arc_easy")["query"].startswith("Question: Which statement best explains why photosynthesis")
    assert _first("arc_easy")["query"].endswith("\nAnswer:") and _first("arc_easy")["gold"] == 0
    wg = _first("winogrande")
    assert wg["contexts"][1] == "Sarah was a much better surgeon than Maria so Maria" and wg["gold"] == 1
    assert wg["continuation"] == "always got the easier cases."
    hs = _first("hellaswag")
    assert hs["query"] == "Roof shingle removal: A man is sitting on a roof. he" and hs["gold"] == 3
    assert _first("rte")["choices"] == ["True", "False"] and _first("rte")["gold"] == 1
    assert _first("boolq")["choices"] == ["no", "yes"]


def test_unknown_task_is_refused():
    with pytest.raises(ConfigError, match="unknown task"):
        task_config("mmlu")


def test_task_examples_mask_the_gold_answer():
    from shadowsparse.llm import byte_tokenizer
    from shadowsparse.tasks import task_examples
    tok = byte_tokenizer()
    for name in ("copa", "winogrande", "arc_easy"):
        first = _first(name)
        (ids, mask), = task_examples(tok, name, 1)
        answer = first["continuation"] if "contexts" in first else first["choices"][first["gold"]]
        context = first["contexts"][first["gold"]] if "contexts" in first else first["query"]
        assert tok.decode(ids[mask]) == " " + answer
        assert tok.decode(ids[~mask]) == context

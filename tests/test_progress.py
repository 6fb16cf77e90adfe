"""Evaluation loops show a tqdm bar with the ETA; in a log (not a terminal) it is redrawn rarely; it can be off."""
import torch

from shadowsparse.perplexity import Level, evaluate_levels
from shadowsparse.progress import progress
from tests.conftest import tiny_model


def test_perplexity_windows_show_a_bar_with_eta(capsys):
    model = tiny_model("llama")
    windows = torch.randint(0, 256, (3, 16))
    evaluate_levels(model, windows, None, [Level(0.0, 0.0)], first_layer=1, desc="dense")
    err = capsys.readouterr().err
    assert "dense, 1 level" in err and "3/3" in err and "<00:00" in err  # elapsed<remaining: the ETA field


def test_non_tty_redraws_rarely_and_the_switch_turns_bars_off(monkeypatch):
    bar = progress(range(3), desc="x")
    assert bar.mininterval == 30.0 and not bar.disable  # pytest's stderr is not a terminal
    monkeypatch.setenv("SHADOWSPARSE_PROGRESS", "0")
    assert progress(range(3), desc="x").disable

"""Third-party log lines a run does not need, dropped one by one (each by its logger and exact message, never a
level or a whole library): the pipeline calls quiet_third_party_logs() once lightning is imported.

- Lightning's own console handler on the ``lightning`` logger, when the root logger has handlers (Hydra's): every
  Lightning line would be printed twice, once by each.
- Lightning's adverts, "💡 Tip: For seamless cloud ..." (litlogger, litmodels).
- torch's FutureWarning that ``isinstance(treespec, LeafSpec)`` is deprecated, raised from Lightning's _pytree.py.

(The tokenizer's "sequence length is longer than the specified maximum" warning is not emitted at all: data.py
tokenizes whole text streams with ``verbose=False``, since it cuts them into windows itself.)
"""
from __future__ import annotations

import logging
import warnings

TIP = "💡 Tip: For seamless cloud"  # lightning.pytorch ... logger_connector.py / callback_connector.py
PYTREE = r"`isinstance\(treespec, LeafSpec\)` is deprecated"  # torch/utils/_pytree.py, via lightning's _pytree.py


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_third_party_logs() -> None:
    """Idempotent; see the module docstring for what goes."""
    warnings.filterwarnings("ignore", message=PYTREE, category=FutureWarning)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropPrefix) for f in rank_zero.filters):
        rank_zero.addFilter(_DropPrefix(TIP))
    if logging.getLogger().hasHandlers():  # the root logger prints Lightning's lines already (under Hydra)
        lightning = logging.getLogger("lightning")
        for handler in list(lightning.handlers):
            if type(handler) is logging.StreamHandler:  # lightning/__init__.py's console handler
                lightning.removeHandler(handler)

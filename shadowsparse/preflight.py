"""Bad input refused before Hydra writes anything: one ``error:`` line naming the key and the fix, exit status 2.

- ``report_config_errors()`` (train.py's ``__main__``): a config that does not compose (a value of the wrong type
  for its schema, ``gating.ffn_sparsity=abc``; an unknown key or group option; a malformed override) is reported
  as one line instead of Hydra's message and exit status 1.
- ``Preflight``, a Hydra callback (conf/hydra/default.yaml): before a run, ``hydra.run.dir`` must be writable and
  the run's config must pass pipeline.validate, so a refused run leaves no run folder; before a sweep (``-m``),
  ``hydra.sweep.dir`` must be writable and every job's config is composed and validated, so a bad value in job 3
  refuses the sweep before job 0 runs, and nothing is written.
"""
from __future__ import annotations

import contextlib
import copy
import os
import re
import sys
from pathlib import Path

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException, ValidationError

from .errors import ConfigError

COMPOSE_ERRORS = (ConfigCompositionException, OverrideParseException)
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
_KINDS = {"Float": ("a number", "0.5"), "Integer": ("a whole number", "8"), "bool": ("true or false", "true")}


def fail(message: str) -> None:
    """The one line a refused run prints, and its exit status."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def compose_error_message(exc: Exception) -> str:
    """One line from a Hydra composition error: the key, the value, what it must be (schema types:
    shadowsparse/schema.py), or Hydra's own text flattened (unknown key, unknown option, bad override syntax)."""
    cause = exc.__cause__
    if isinstance(cause, ValidationError) and cause.full_key:
        first = str(cause.msg).splitlines()[0]
        m = re.search(r"converted to (\w+)|is not a valid (bool)", first)
        if m and (m.group(1) or m.group(2)) in _KINDS:
            kind, example = _KINDS[m.group(1) or m.group(2)]
            key = cause.full_key
            return f"{key}={cause.value!r} is not {kind} ({first}); set {key} to {kind}, e.g. {key}={example}"
    text = str(exc).split("Config search path")[0]
    if isinstance(exc, MissingConfigException) and "Available options" in text:
        head, options = text.split("Available options", 1)
        group, _, names = options.partition(":")
        names = [n.strip() for n in names.splitlines() if n.strip()]
        group = group.strip().removeprefix("in ").strip("'")
        return f"{' '.join(head.split())}; choose one of {', '.join(names)} ({group}=<option>)"
    line = " ".join(text.split())
    if isinstance(cause, OmegaConfBaseException):
        line += f" ({str(cause.msg).splitlines()[0]})"
    return line


@contextlib.contextmanager
def report_config_errors():
    """While the Hydra app runs: a config that does not compose exits 2 with one ``error:`` line (Hydra would print
    its own message and exit 1). HYDRA_FULL_ERROR=1 keeps Hydra's full report."""
    import hydra._internal.utils as hydra_utils  # where hydra.main's _run_hydra finds run_and_report
    original = hydra_utils.run_and_report

    def run_and_report(func):
        def checked():
            try:
                return func()
            except COMPOSE_ERRORS as exc:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                fail(compose_error_message(exc))
        return original(checked)

    hydra_utils.run_and_report = run_and_report
    try:
        yield
    finally:
        hydra_utils.run_and_report = original


def _select(config: DictConfig, key: str):
    try:
        return OmegaConf.select(config, key, throw_on_resolution_failure=True)
    except OmegaConfBaseException:
        return None  # an interpolation only Hydra's job setup can resolve: Hydra checks it then


def validate_job(config: DictConfig, output_dir: str) -> None:
    """pipeline.validate on a composed job config (with its hydra node), as the job will see it: its
    ``${hydra:runtime.output_dir}`` is ``output_dir``."""
    from hydra.core.hydra_config import HydraConfig

    from .pipeline import validate
    job = copy.deepcopy(config)
    with read_write(job.hydra), open_dict(job.hydra):
        job.hydra.runtime.output_dir = os.path.abspath(output_dir)
    task = copy.deepcopy(job)
    with read_write(task), open_dict(task):
        del task["hydra"]
    hydra_config = HydraConfig.instance()
    saved = hydra_config.cfg
    hydra_config.set_config(job)
    try:
        validate(task)
    finally:
        hydra_config.cfg = saved


def sweep_jobs(config: DictConfig) -> tuple[list[list[str]], set[str]] | None:
    """Every job's overrides, as Hydra's basic sweeper will launch them, and the keys swept over (None: another
    sweeper, whose jobs are only known as it runs)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    sweeper = config.hydra.sweeper
    if sweeper.get("_target_") != BASIC_SWEEPER:
        return None
    arguments = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    arguments += list(config.hydra.overrides.task)
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    overrides = parser.parse_overrides(arguments)
    batches = BasicSweeper.split_arguments(overrides, sweeper.get("max_batch_size"))
    swept = {o.get_key_element() for o in overrides if o.is_sweep_override()}
    return [list(job) for batch in batches for job in batch], swept


class Preflight(Callback):
    """conf/hydra/default.yaml: hydra.callbacks.preflight."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        run_dir = _select(config, "hydra.run.dir")
        if run_dir is None:
            return
        try:
            from .pipeline import check_writable
            check_writable(run_dir, "hydra.run.dir")
            validate_job(config, str(run_dir))
        except ConfigError as exc:
            fail(str(exc))

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from hydra.core.global_hydra import GlobalHydra

        from .pipeline import check_writable
        sweep_dir = _select(config, "hydra.sweep.dir")
        try:
            if sweep_dir is not None:
                check_writable(sweep_dir, "hydra.sweep.dir")
            sweep = sweep_jobs(config)
        except ConfigError as exc:
            fail(str(exc))
        except COMPOSE_ERRORS as exc:
            fail(compose_error_message(exc))
        if sweep is None:
            return
        jobs, swept = sweep
        loader = GlobalHydra.instance().config_loader()
        for num, overrides in enumerate(jobs):
            values = " ".join(o for o in overrides if o.split("=", 1)[0] in swept)
            where = f"sweep job {num} of {len(jobs)} ({values})" if values else f"sweep job {num} of {len(jobs)}"
            try:
                job = loader.load_sweep_config(config, list(overrides))  # as the launcher composes it
                with open_dict(job):
                    job.hydra.job.id = num
                    job.hydra.job.num = num
                subdir = _select(job, "hydra.sweep.subdir")
                validate_job(job, str(Path(str(_select(job, "hydra.sweep.dir"))) / str(subdir if subdir is not None
                                                                                          else num)))
            except ConfigError as exc:
                fail(f"{where}: {exc} (no job of the sweep was run)")
            except COMPOSE_ERRORS as exc:
                fail(f"{where}: {compose_error_message(exc)} (no job of the sweep was run)")

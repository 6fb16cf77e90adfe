"""python train.py [experiment=smollm2|smoke|opt13b] [group=option] [key=value ...]   (-m for sweeps)"""
import sys

import hydra
from omegaconf import DictConfig

from shadowsparse.errors import ConfigError
from shadowsparse.preflight import report_config_errors
from shadowsparse.schema import register_schemas  # noqa: F401  (types conf/ groups before the compose)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from shadowsparse.pipeline import run
    try:
        metrics = run(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    return metrics.get("predictor/ppl@ffn0.50_heads0.00")


if __name__ == "__main__":
    with report_config_errors():  # a config that does not compose: one error line, exit 2 (not Hydra's exit 1)
        main()

"""What a trained run decided, for using its ensemble elsewhere: crops, variant weights, smoothing.

``ferflow annotate`` and ``ferflow export`` take them from the run's files, each overridable:

- ``--config`` (default ``./config.yaml`` when it exists): ``extract`` (detector, margin, crop size,
  ``detect_every``, ...: the detection, tracking and cropping the variants were trained on) and
  ``variants[].weight`` (the soft-vote weights; valence/arousal are averaged with weight 1, as
  ``evaluate_ensemble`` does);
- ``--extract-settings JSON``: extraction keys over the config's; ``--weights NAME=W ...``: weights
  over the config's;
- ``--metrics`` (default ``<models>/../evaluation/metrics.json`` when it exists): the smoothing
  windows chosen on validation (``"smoothed"."window"``); none without it or with ``--no-smoothing``.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .ensemble import smoothing_from

DEFAULT_CONFIG = "config.yaml"


@dataclass
class RunConfig:
    extract: dict  # extraction settings given (config, then --extract-settings); ferflow.extract fills the rest
    weights: dict[str, float]
    smoothing: dict[str, int]
    sources: list[str] = field(default_factory=list)  # where each part came from, for the log
    config: str | None = None  # the config file read, if any


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help=f"the run's config.yaml (extract settings, variant weights; default ./{DEFAULT_CONFIG} if present)")
    p.add_argument("--metrics", default=None,
                   help="metrics.json of the run's evaluation, for the smoothing windows chosen on validation "
                        "(default <models>/../evaluation/metrics.json if present)")
    p.add_argument("--extract-settings", default=None, metavar="JSON",
                   help='extraction settings over the config\'s, e.g. \'{"detector": "haar", "detect_every": 1}\'')
    p.add_argument("--weights", nargs="*", default=[], metavar="NAME=W",
                   help="soft-vote weights of the variants, over the config's (default 1)")
    p.add_argument("--no-smoothing", action="store_true", help="no temporal smoothing")


def run_config(config: str | None, metrics: str | None, models_dir: str | os.PathLike | None,
               extract_json: str | None = None, smoothing: bool = True, weight_args: Sequence[str] = ()) -> RunConfig:
    """Read a run's settings (see the module docstring). ValueError names a file it cannot use."""
    sources = []
    extract: dict = {}
    weights: dict[str, float] = {}
    if config is None and Path(DEFAULT_CONFIG).is_file():
        config = DEFAULT_CONFIG
    if config is not None:
        import yaml

        try:
            data = yaml.safe_load(Path(config).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"{config}: cannot read the run's config: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{config}: not a ferflow config (a mapping of keys)")
        extract = dict(data.get("extract") or {})
        weights = {v["name"]: float(v["weight"]) for v in data.get("variants") or [] if "weight" in v}
        sources.append(f"extract settings and weights from {config}")
    for item in weight_args:
        name, _, value = item.partition("=")
        try:
            weights[name] = float(value)
        except ValueError:
            weights[name] = -1.0
        if not name or not weights[name] > 0:
            raise ValueError(f"--weights: expected NAME=W with W > 0, got {item!r}")
    if extract_json:
        try:
            extract.update(json.loads(extract_json))
        except ValueError as exc:
            raise ValueError(f"--extract-settings: not JSON: {exc}") from None
    windows = {"expr": 0, "va": 0}
    if smoothing:
        if metrics is None and models_dir is not None:
            guess = Path(models_dir).parent / "evaluation" / "metrics.json"
            metrics = str(guess) if guess.is_file() else None
        if metrics is not None:
            windows = smoothing_from(metrics)
            sources.append(f"smoothing windows {windows} from {metrics}")
        else:
            sources.append("WARNING: no metrics.json found (give --metrics, or run the evaluation first): "
                           "no smoothing, the per-frame predictions are written as they are")
    return RunConfig(extract, weights, windows, sources, config)


def from_args(args: argparse.Namespace, models_dir: str | os.PathLike | None) -> RunConfig:
    """:func:`run_config` from the options of :func:`add_run_arguments`."""
    return run_config(args.config, args.metrics, models_dir, args.extract_settings,
                      smoothing=not args.no_smoothing, weight_args=args.weights)

"""Shared helpers for the deploy tests: paths, config loading, and bundle-to-node packing."""

from __future__ import annotations

from pathlib import Path

import yaml

from coordexp_rl.config import Config, load_config
from coordexp_rl.driver.placement import bundles as driver_bundles

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
DEPLOY = ROOT / "deploy"
GPU_CONFIGS = ["qwen3vl_2b_1node.yaml", "qwen3vl_8b_1node.yaml", "qwen3vl_8b_2nodes.yaml"]


def all_config_files() -> list[Path]:
    return sorted(CONFIGS.rglob("*.yaml"))


def bundles(cfg: Config) -> list[dict[str, float]]:
    """The placement bundles the driver would ask Ray for (the real code path, no Ray started)."""
    return driver_bundles(cfg)


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def pack(bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> list[int] | None:
    """First-fit-decreasing placement of bundles onto nodes; the node index of each bundle, or None.

    A bundle never spans nodes (Ray's rule), so this is stricter than comparing totals:
    >>> pack([{"GPU": 4}, {"GPU": 4}], [{"GPU": 6}, {"GPU": 2}]) is None
    True
    >>> pack([{"GPU": 1, "CPU": 8}, {"GPU": 4, "CPU": 16}], [{"GPU": 8, "CPU": 64}])
    [0, 0]
    """
    free = [dict(n) for n in nodes]
    where: list[int | None] = [None] * len(bundles)
    order = sorted(range(len(bundles)), key=lambda i: (-bundles[i].get("GPU", 0), -bundles[i].get("CPU", 0)))
    for i in order:
        for n, room in enumerate(free):
            if all(room.get(k, 0) >= v for k, v in bundles[i].items()):
                for k, v in bundles[i].items():
                    room[k] = room.get(k, 0) - v
                where[i] = n
                break
        else:
            return None
    return where  # type: ignore[return-value]


def config(name: str, overrides: list[str] | None = None) -> Config:
    return load_config(CONFIGS / name, overrides)

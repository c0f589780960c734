"""Engines run client updates: `serial` in-process, `ray` on client actors."""

from __future__ import annotations

from fmlray.config import Config
from fmlray.engine.base import Engine, EvalResult, RoundResult

__all__ = ["Engine", "EvalResult", "RoundResult", "make_engine"]


def make_engine(cfg: Config) -> Engine:
    """The engine named by cfg.engine.kind (Ray is imported only when asked for)."""
    if cfg.engine.kind == "ray":
        from fmlray.engine.ray_engine import RayEngine
        return RayEngine()
    from fmlray.engine.serial import SerialEngine
    return SerialEngine()

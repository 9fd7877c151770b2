"""The registry of strategy specs: run-config name -> ``StrategySpec``."""

from __future__ import annotations

from .spec import StrategySpec

_SPECS: dict[str, StrategySpec] = {}


def register(spec: StrategySpec) -> StrategySpec:
    """Add ``spec`` under its name (once: a second spec of one name is a mistake)."""
    if spec.name in _SPECS:
        raise ValueError(f"A strategy named {spec.name!r} is registered already")
    _SPECS[spec.name] = spec
    return spec


def names() -> tuple[str, ...]:
    """Every registered strategy name, in registration order."""
    return tuple(_SPECS)


def spec(name: str) -> StrategySpec:
    """The spec of strategy ``name``; ValueError naming the accepted names."""
    try:
        return _SPECS[name]
    except KeyError:
        raise ValueError(f"Run config 'strategy' must be one of {list(_SPECS)}; got {name!r}") from None


def with_trait(trait: str) -> list[str]:
    """The names of the strategies whose trait ``trait`` is true (registration order)."""
    return [name for name, s in _SPECS.items() if getattr(s.traits, trait)]

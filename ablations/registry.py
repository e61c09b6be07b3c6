"""The ablation registry: built-ins register on import, other packages through an entry-point group.

A third-party package adds an ablation by declaring, in its pyproject.toml,
    [project.entry-points."gan_ablations.ablations"]
    my_trick = "my_package.my_module:MyTrick"
where MyTrick subclasses Ablation. Duplicate names are refused.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import ClassVar

from core.errors import UserError
from core.hooks import Hooks

ENTRY_POINT_GROUP = "gan_ablations.ablations"
_REGISTRY: dict[str, type["Ablation"]] = {}
_entry_points_loaded = False


class Ablation:
    """One trick under test: named variants as dotted config overrides, baseline first; hooks if unavoidable."""
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for --list
    variants: ClassVar[dict[str, dict[str, object]]] = {"baseline": {}}

    def hooks(self, variant: str) -> list[Hooks]:
        """Trainer hooks this variant needs; none of the built-ins needs any."""
        return []

    def overrides(self, variant: str) -> dict[str, object]:
        if variant not in self.variants:
            raise UserError(f"ablation '{self.name}' has no variant '{variant}'; known: {', '.join(self.variants)}")
        return dict(self.variants[variant])

    def varied_keys(self) -> set[str]:
        return {k for overrides in self.variants.values() for k in overrides}


def register_ablation(cls: type[Ablation]) -> type[Ablation]:
    """Class decorator: add an Ablation subclass to the registry under its `name`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"ablation name '{cls.name}' is registered twice ({_REGISTRY[cls.name].__module__} "
                         f"and {cls.__module__})")
    if next(iter(cls.variants)) != "baseline":
        raise ValueError(f"ablation '{cls.name}' must list its 'baseline' variant first")
    _check_baseline(cls)
    _REGISTRY[cls.name] = cls
    return cls


def _check_baseline(cls: type[Ablation]) -> None:
    """The baseline is the preset unchanged. It may pin only what the other variants vary, and only to the
    default values, so that a preset which changes that key (the cpu preset turns G_ema on) still has its
    'off' in the study; under the default preset the baseline is then exactly the preset."""
    from core.config import RunConfig, flatten
    defaults = flatten(RunConfig())
    varied = {k for name, overrides in cls.variants.items() if name != "baseline" for k in overrides}
    for key, value in cls.variants["baseline"].items():
        if key not in varied or defaults.get(key) != value:
            raise ValueError(f"ablation '{cls.name}': its baseline may pin only keys its variants vary, to their "
                             f"default values; {key}={value!r} is not one")


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        cls = ep.load()
        if _REGISTRY.get(ep.name) is not cls:
            if ep.name != cls.name:
                raise ValueError(f"entry point '{ep.name}' points to ablation named '{cls.name}'")
            register_ablation(cls)


def list_ablations() -> list[str]:
    _load_entry_points()
    return list(_REGISTRY)


def get_ablation(name: str) -> Ablation:
    """The one way to look an ablation up; an unknown name lists every known one."""
    _load_entry_points()
    if name not in _REGISTRY:
        raise UserError(f"unknown ablation '{name}'; known: {', '.join(list_ablations())}")
    return _REGISTRY[name]()

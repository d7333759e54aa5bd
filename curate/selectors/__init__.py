"""Selectors (docs/architecture.md "Contracts"): the contract, baselines, LESS, BIDS, TAROT, Quad, CHES,
CritiQ and RDS+.

:data:`SELECTORS` is the one registry (name -> selector class); ``curate list`` prints it and every
entry gets its pipeline step (``use: <name>`` in a recipe, see :mod:`curate.selectors.step`) when
this package is imported. Adding a selector: write a frozen keyword-only dataclass subclassing
:class:`~curate.selectors.base.BaseSelector` and add it to the literal below. Selector modules do
not register themselves, so importing one never changes the registry; code outside the package
(plugins, tests) adds a selector with :func:`register_selector`.
"""

from __future__ import annotations

from curate.errors import RecipeError
from curate.selectors.base import BaseSelector, Budget, Selection, Selector
from curate.selectors.baselines import DeitaSelector, DSIRSelector, KCenterSelector, RandomSelector, TopKSelector
from curate.selectors.bids import BidsSelector
from curate.selectors.ches import ChesSelector
from curate.selectors.critiq.scorer import CritiqSelector
from curate.selectors.less import LessSelector
from curate.selectors.quad import QuadSelector
from curate.selectors.rds import RdsSelector
from curate.selectors.step import make_step
from curate.selectors.tarot import TarotSelector

SELECTORS: dict[str, type[BaseSelector]] = {
    "random": RandomSelector,
    "topk": TopKSelector,
    "kcenter": KCenterSelector,
    "deita": DeitaSelector,
    "dsir": DSIRSelector,
    "less": LessSelector,
    "bids": BidsSelector,
    "tarot": TarotSelector,
    "ches": ChesSelector,
    "quad": QuadSelector,
    "critiq": CritiqSelector,
    "rds": RdsSelector,
}

for _cls in SELECTORS.values():
    make_step(_cls)


def register_selector(cls: type[BaseSelector]) -> type[BaseSelector]:
    """Add ``cls`` to :data:`SELECTORS` under ``cls.name`` and register its pipeline step.

    For selectors defined outside this package; the built-in ones are listed in :data:`SELECTORS`.
    """
    if cls.name in SELECTORS and SELECTORS[cls.name] is not cls:
        raise RuntimeError(f"selector name '{cls.name}' registered twice.")
    if cls.name not in SELECTORS:
        SELECTORS[cls.name] = cls
        make_step(cls)
    return cls


def load_selector_plugins() -> list[str]:
    """Add the selectors of installed packages (entry-point group ``curate.selectors``, each a
    selector class); returns their names. Runs once when this package is imported."""
    from curate.io.plugins import entry_point_objects

    return [register_selector(cls).name for _, cls in entry_point_objects("curate.selectors")]


def get_selector(name: str) -> type[BaseSelector]:
    """The selector class registered as ``name``; raises a ``RecipeError`` listing the known ones."""
    if name not in SELECTORS:
        raise RecipeError(f"unknown selector '{name}'. Known selectors: {', '.join(sorted(SELECTORS))}.")
    return SELECTORS[name]


__all__ = [
    "SELECTORS", "BaseSelector", "BidsSelector", "Budget", "ChesSelector", "CritiqSelector", "DSIRSelector",
    "DeitaSelector", "KCenterSelector", "LessSelector", "QuadSelector", "RandomSelector", "RdsSelector", "Selection",
    "Selector", "TarotSelector", "TopKSelector", "get_selector", "load_selector_plugins", "register_selector",
]

load_selector_plugins()

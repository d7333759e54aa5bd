"""Selectors (DESIGN.md "Selectors"): the contract, baselines, LESS, BIDS, TAROT.

:data:`SELECTORS` is the one registry (name -> selector class); ``curate list`` prints it. Adding
a selector: write a frozen keyword-only dataclass subclassing
:class:`~curate.selectors.base.BaseSelector`, then :func:`register_selector` it; that also
registers its pipeline step (``curate.selectors.step``). Modules added later (quad, ches,
critiq/) register themselves the same way.
"""

from __future__ import annotations

from curate.selectors.base import BaseSelector, Budget, Selection, Selector
from curate.selectors.baselines import DeitaSelector, DSIRSelector, KCenterSelector, RandomSelector, TopKSelector
from curate.selectors.bids import BidsSelector
from curate.selectors.less import LessSelector
from curate.selectors.step import make_step
from curate.selectors.tarot import TarotSelector

SELECTORS: dict[str, type[BaseSelector]] = {}


def register_selector(cls: type[BaseSelector]) -> type[BaseSelector]:
    """Add ``cls`` to :data:`SELECTORS` under ``cls.name`` and register its pipeline step."""
    if cls.name in SELECTORS and SELECTORS[cls.name] is not cls:
        raise RuntimeError(f"selector name '{cls.name}' registered twice.")
    SELECTORS[cls.name] = cls
    make_step(cls)
    return cls


for _cls in (RandomSelector, TopKSelector, KCenterSelector, DeitaSelector, DSIRSelector, LessSelector,
             BidsSelector, TarotSelector):
    register_selector(_cls)

from curate.selectors import ches as _ches  # noqa: E402,F401  (registers CHES; imports torch lazily)
from curate.selectors import quad as _quad  # noqa: E402,F401  (registers Quad; imports torch/faiss lazily)


def get_selector(name: str) -> type[BaseSelector]:
    """The selector class registered as ``name``; raises a ``RecipeError`` listing the known ones."""
    if name not in SELECTORS:
        from curate.errors import RecipeError

        raise RecipeError(f"unknown selector '{name}'. Known selectors: {', '.join(sorted(SELECTORS))}.")
    return SELECTORS[name]


# Selectors written in their own modules register themselves on import; import them here so that
# SELECTORS is complete whenever the package is imported (a module not written yet is skipped).
for _mod in ("quad", "ches", "critiq"):
    try:
        __import__(f"curate.selectors.{_mod}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"curate.selectors.{_mod}":
            raise

__all__ = [
    "SELECTORS", "BaseSelector", "BidsSelector", "Budget", "DSIRSelector", "DeitaSelector", "KCenterSelector",
    "LessSelector", "RandomSelector", "Selection", "Selector", "TarotSelector", "TopKSelector", "get_selector",
    "register_selector",
]

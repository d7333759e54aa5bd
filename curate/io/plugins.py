"""Loading user code: plugin modules and files, ``module:object`` references and entry points.

Every plugin loaded is recorded in :data:`LOADED` (what it was named, its module, its version and
the sha256 of its file), so manifests can say which code made a run and cache keys can change when
that code changes (:func:`code_key`). A plugin that fails to import raises a
:class:`~curate.errors.RecipeError` naming it (the CLI exits 2), never a bare traceback.

Entry-point groups: ``curate.steps`` (a module whose import registers steps, or a step class),
``curate.selectors`` (a selector class), ``curate.formats`` (a
:class:`~curate.io.formats.FormatInfo`, tried before the built-in formats).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

from curate.errors import RecipeError

#: module name -> {"plugin", "module", "version", "file", "sha256"} of every plugin loaded.
LOADED: dict[str, dict[str, Any]] = {}
FILE_PREFIX = "curate_plugin_"
_GROUPS_DONE: set[str] = set()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _version(module: ModuleType) -> str | None:
    top = module.__name__.split(".")[0]
    try:
        dists = metadata.packages_distributions().get(top) or []
        if dists:
            return metadata.version(dists[0])
    except Exception:  # noqa: BLE001 - broken metadata of some other package must not stop a run
        pass
    version = getattr(sys.modules.get(top), "__version__", None)
    return str(version) if version is not None else None


def record(module: ModuleType, named: str, version: str | None = None) -> dict[str, Any]:
    """Record ``module`` (loaded because ``named`` asked for it) in :data:`LOADED` and return it."""
    file = getattr(module, "__file__", None)
    rec = {"plugin": named, "module": module.__name__, "version": version or _version(module),
           "file": file, "sha256": _sha256(Path(file)) if file and Path(file).is_file() else None}
    LOADED[module.__name__] = rec
    return rec


def _failed(named: str, exc: BaseException) -> RecipeError:
    where = f" (line {exc.lineno})" if isinstance(exc, SyntaxError) and exc.lineno else ""
    return RecipeError(f"plugin '{named}' failed to import{where}: {type(exc).__name__}: {exc}")


def is_file_plugin(spec: str) -> bool:
    """Whether ``spec`` names a Python file (``./my_steps.py``) rather than a module (``mypkg.steps``)."""
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def import_module(spec: str, base: Path | None = None, *, forget: Any = None) -> tuple[ModuleType, dict[str, Any]]:
    """Import a plugin module or file and record it.

    A file is imported as module ``curate_plugin_<stem>_<hash of its path>`` (relative paths
    against ``base``); importing the same unchanged file again returns the loaded module. When the
    file changed, ``forget(module_name)`` is called first (to drop what the old code registered).

    Raises:
        RecipeError: no such file or module, or the import raised.
    """
    if not is_file_plugin(spec):
        try:
            module = importlib.import_module(spec)
        except Exception as exc:  # noqa: BLE001 - any error in user code is reported with its name
            raise _failed(spec, exc) from exc
        return module, LOADED.get(module.__name__) or record(module, spec)
    path = Path(spec).expanduser()
    if not path.is_absolute():
        path = (base or Path.cwd()) / path
    path = path.resolve()
    if not path.is_file():
        raise RecipeError(f"plugin '{spec}' not found: no file {path}.")
    name = FILE_PREFIX + path.stem.replace("-", "_") + "_" + hashlib.blake2b(str(path).encode(), digest_size=4).hexdigest()
    digest = _sha256(path)
    if name in sys.modules and LOADED.get(name, {}).get("sha256") == digest:
        return sys.modules[name], LOADED[name]
    if name in sys.modules and forget is not None:
        forget(name)
    mod_spec = importlib.util.spec_from_file_location(name, path)
    if mod_spec is None or mod_spec.loader is None:
        raise RecipeError(f"plugin '{spec}' is not an importable Python file: {path}.")
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = module
    try:
        mod_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - any error in user code is reported with its name
        sys.modules.pop(name, None)
        raise _failed(spec, exc) from exc
    return module, record(module, spec)


def import_object(ref: str, base: Path | None = None) -> Any:
    """The object named by ``module:attr`` (or ``path/to/file.py:attr``)."""
    mod_name, _, attr = ref.rpartition(":")
    if not mod_name or not attr:
        raise RecipeError(f"'{ref}' is not a plugin reference; write module.path:ClassName.")
    module, _ = import_module(mod_name, base)
    try:
        obj: Any = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise RecipeError(f"plugin '{ref}': module {mod_name} has no '{attr}'.") from None
    return obj


def entry_point_objects(group: str) -> list[tuple[str, Any]]:
    """``(name, loaded object)`` of every entry point in ``group`` (sorted by name), recorded.

    Raises:
        RecipeError: an entry point failed to load (names it and its distribution).
    """
    out = []
    for ep in sorted(metadata.entry_points(group=group), key=lambda e: (e.name, e.value)):
        dist = getattr(getattr(ep, "dist", None), "name", None)
        named = f"{ep.name} = {ep.value} ({group}{', ' + dist if dist else ''})"
        try:
            obj = ep.load()
        except Exception as exc:  # noqa: BLE001 - any error in user code is reported with its name
            raise _failed(named, exc) from exc
        mod_name = obj.__name__ if isinstance(obj, ModuleType) else getattr(obj, "__module__", None)
        module = sys.modules.get(mod_name or "")
        if module is not None and module.__name__ not in LOADED:
            record(module, named, getattr(getattr(ep, "dist", None), "version", None))
        out.append((ep.name, obj))
    return out


def load_format_plugins() -> None:
    """Add the formats of the ``curate.formats`` entry points to ``FORMATS`` once, in front of the
    built-in ones (an installed format is meant to win over a generic built-in fallback)."""
    if "curate.formats" in _GROUPS_DONE:
        return
    _GROUPS_DONE.add("curate.formats")
    from curate.io.formats import FORMATS, FormatInfo

    found = {}
    for name, obj in entry_point_objects("curate.formats"):
        info = obj() if callable(obj) and not isinstance(obj, FormatInfo) else obj
        if not isinstance(info, FormatInfo):
            raise RecipeError(f"plugin format '{name}' is not a curate.io.FormatInfo (got {type(info).__name__}).")
        found[info.name] = info
    if found:
        builtin = [(k, v) for k, v in FORMATS.items() if k not in found]
        FORMATS.clear()
        FORMATS.update(found)
        FORMATS.update(builtin)


def code_key(obj: Any) -> tuple[Any, ...]:
    """Cache-key part for an object whose class comes from a plugin: its module's file hash and
    version; empty for curate's own classes (their keys stay what they were)."""
    rec = LOADED.get(type(obj).__module__)
    return () if rec is None else (("plugin", rec["module"], rec["version"], rec["sha256"]),)


def plugin_records(modules: list[str] | None = None) -> list[dict[str, Any]]:
    """Records of ``modules`` (default: every plugin loaded), sorted by module name."""
    names = sorted(LOADED) if modules is None else sorted(set(modules) & set(LOADED))
    return [dict(LOADED[n]) for n in names]


def ship_by_value() -> None:
    """Have Ray send the code of file plugins with each task: its workers cannot import a module
    that exists only because a file was executed in this process."""
    import sys as _sys

    files = [_sys.modules[n] for n, rec in LOADED.items() if n.startswith(FILE_PREFIX) and n in _sys.modules]
    if not files:
        return
    from curate._lazy import require

    pickler = require("ray", "the ray executor").cloudpickle
    for module in files:
        pickler.register_pickle_by_value(module)

"""Export a recorded run: rebuild its variant, write it in one format, write its model card beside it.

``workbench export`` and the lab's Deploy tab both call :func:`export_run`, so a folder written from either is
the same folder. Each format's exporter is one entry of :data:`EXPORT_FORMATS`, called as
``fn(loaded base model, variant, folder)`` and returning a :class:`~workbench.runtimes.card.ExportInfo`.

An export that fails (a variant no GGUF type holds, a stopped job, a full disk) leaves nothing behind: the
folder it created is removed, and a folder that was there (empty) is emptied again, so a failed try never
looks like an export.
"""

from __future__ import annotations

import importlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.errors import ConfigError

EXPORT_FORMATS: dict[str, Callable[[Any, Any, Path], Any]] = {
    "compressed-tensors": lambda loaded, variant, out: importlib.import_module(
        "workbench.runtimes.hf_export"
    ).export_compressed_tensors(loaded, variant, out),
    "safetensors": lambda loaded, variant, out: importlib.import_module(
        "workbench.runtimes.hf_export"
    ).export_safetensors(variant, loaded.tokenizer, out),
    "gguf": lambda loaded, variant, out: importlib.import_module(
        "workbench.runtimes.gguf"
    ).export_gguf_folder(loaded, variant, out),
}


@dataclass
class RunExport:
    """What :func:`export_run` wrote: the run, the exporter's :class:`ExportInfo`, and the card's path.

    ``files`` lists every file written (the exporter's, then the card), ``sizes`` their bytes.
    """

    run: Any
    info: Any
    card: Path

    @property
    def folder(self) -> Path:
        return self.card.parent

    @property
    def files(self) -> list[str]:
        return self.info.files + ([self.card.name] if self.card.name not in self.info.files else [])

    @property
    def sizes(self) -> dict[str, int]:
        return {name: (self.folder / name).stat().st_size for name in self.files}

    @property
    def reload_check(self) -> str | None:
        """ "passed" / "FAILED" when the format reloads its folder through transformers, else None."""
        return self.info.details.get("reload_check")


def check_folder(folder: str | Path) -> Path:
    """``folder`` as a Path, refused (ConfigError) unless it is new or an empty folder."""
    out = Path(folder).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not an empty folder; give a new folder.")
    return out


def export_run(
    run: Any,
    fmt: str,
    folder: str | Path,
    *,
    registry: Any,
    model: Any = "demo",
    suite: Any = None,
    progress: Any = None,
) -> RunExport:
    """Rebuild recorded ``run``'s variant (a registry Run or its id) on ``model``, export it as ``fmt`` into
    ``folder`` (new or empty) and write its model card there. ``suite``: the run's suite when it is a custom
    one (see :func:`~workbench.runtimes.card.rebuild_variant`).

    Raises:
        ConfigError: an unknown format, an occupied folder, a run that cannot be rebuilt (not done, a runtime
            run, another model; see :func:`~workbench.runtimes.card.rebuild_variant`), or a variant the format
            cannot hold (GGUF: :class:`~workbench.runtimes.gguf.NoExactType`, naming the closest type).
    """
    from workbench.progress import as_progress
    from workbench.runtimes.card import _get_run, rebuild_variant, write_card

    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"Unknown export format {fmt!r}; formats: {', '.join(sorted(EXPORT_FORMATS))}.")
    out = check_folder(folder)
    progress = as_progress(progress)
    run = _get_run(run, registry)
    loaded, variant = rebuild_variant(
        run, registry=registry, model=model, suite=suite, progress=progress.span(0.0, 0.7)
    )
    progress.check()
    created = not out.exists()
    try:
        progress.update(0.7, f"writing {fmt}")
        info = EXPORT_FORMATS[fmt](loaded, variant, out)
        progress.check()
        progress.update(0.95, "writing the model card")
        card = write_card(out, run, registry=registry, export_info=info)
    except BaseException:
        _remove_written(out, created)
        raise
    progress.update(1.0, f"exported run {run.id} as {fmt}")
    return RunExport(run, info, card)


def _remove_written(out: Path, created: bool) -> None:
    if not out.is_dir():
        return
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    for entry in out.iterdir():  # the folder was there and empty: empty it again
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


__all__ = ["EXPORT_FORMATS", "RunExport", "check_folder", "export_run"]

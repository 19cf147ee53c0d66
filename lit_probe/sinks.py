"""Where figures go: disk (atomic writes), Weights & Biases, TensorBoard.

* :func:`safe_name` -- a file-system-safe, collision-free directory name for a module path.
* :func:`atomic_write_bytes` / :func:`atomic_write_text` -- temp file in the same directory, flush,
  fsync, ``os.replace``; a reader never sees a truncated file and no temp file survives a failure.
* :class:`DiskSink` -- ``root/<safe layer>/<figure>.png`` (overwrite) or
  ``<figure>_step000123.png`` (versioned, newest ``max_versions`` kept). An ``OSError`` (read-only,
  disk full, quota) warns once and disables disk output; training goes on.
* :class:`WandbSink` -- images through a Lightning ``WandbLogger`` (``log_image`` at the trainer's global
  step) or a bare ``wandb`` run (``run.log({..., "trainer/global_step": step})``, never ``step=``).
* :class:`TensorBoardSink` -- ``SummaryWriter.add_image`` on a Lightning ``TensorBoardLogger``.
* :func:`image_sinks_for` -- builds the W&B / TensorBoard sinks for a trainer's loggers.

This is the only module that imports ``wandb``, and only lazily inside functions. It never imports
lightning: logger objects are duck-typed by class name and public attributes.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Literal, Sequence

__all__ = [
    "DiskSink",
    "TensorBoardSink",
    "WandbSink",
    "atomic_write_bytes",
    "atomic_write_text",
    "figure_file",
    "image_sinks_for",
    "safe_name",
]

log = logging.getLogger(__name__)

_SLUG_OK = re.compile(r"[^A-Za-z0-9._-]")
_MAX_SLUG = 80
_WINDOWS_RESERVED = {
    "CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))
}


# ----------------------------------------------------------------------------------------------
# names and atomic files
# ----------------------------------------------------------------------------------------------
def safe_name(layer: str) -> str:
    """A file-system-safe directory name for a module path.

    Characters outside ``[A-Za-z0-9._-]`` become ``_``, leading dots/dashes are stripped and the slug is
    cut to 80 characters. Whenever the slug differs from the real name -- or the name is empty, ``.``,
    ``..``, has upper-case letters (case-insensitive file systems), ends in a dot, or is a Windows device
    name -- ``-`` plus 10 hex digits of the name's SHA-1 are appended. So ``"a/b"`` and ``"a_b"``,
    ``"Conv"`` and ``"conv"`` never collide, and ``"../x"``, ``".."``, ``""`` or a NUL byte never escape.

    Args:
        layer: the module path, e.g. ``"layer1.0.conv1"``.

    Returns:
        A non-empty name without path separators that is neither ``"."`` nor ``".."``.
    """
    name = str(layer)
    slug = _SLUG_OK.sub("_", name).lstrip(".-")[:_MAX_SLUG]
    needs_hash = (
        slug != name
        or not slug
        or slug.endswith(".")
        or any(c.isupper() for c in name)
        or slug.split(".")[0].upper() in _WINDOWS_RESERVED
    )
    if not needs_hash:
        return slug
    digest = hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{slug.rstrip('.')}-{digest}" if slug.rstrip(".") else f"_-{digest}"


def figure_file(figure: str, *, tag: str = "", step: int | None = None) -> str:
    """The file name of a figure, defined once: ``<figure>.png`` (overwrite mode), ``<figure>_step000123.png``
    (versioned), ``<figure>_at.png`` (the step that fired) and ``<figure>_before.png`` (the last one before)."""
    fig = safe_name(figure)
    if tag:
        return f"{fig}_{tag}.png"
    return f"{fig}.png" if step is None else f"{fig}_step{int(step):06d}.png"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically.

    A temp file is created in the same directory, written, flushed and fsynced, made world-readable
    (0o644) and moved over ``path`` with ``os.replace``; readers see the old or the new file, never a
    partial one. The temp file is removed when anything fails.

    Args:
        path: destination; its directory must exist.
        data: the content.

    Raises:
        OSError: when the directory is not writable, the disk is full, etc.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=f".{path.name[:60]}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.chmod(tmp, 0o644)
        except OSError:  # best effort (e.g. file systems without modes)
            pass
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`atomic_write_bytes`.

    Args:
        path: destination; its directory must exist.
        text: the content.

    Raises:
        OSError: when writing fails.
    """
    atomic_write_bytes(path, text.encode("utf-8"))


# ----------------------------------------------------------------------------------------------
# disk
# ----------------------------------------------------------------------------------------------
class DiskSink:
    """Write figure PNGs under ``root``.

    Args:
        root: output directory (created on first write).
        mode: ``"overwrite"``: ``root/<safe_name(layer)>/<figure>.png`` replaced atomically;
            ``"versioned"``: ``root/<safe_name(layer)>/<figure>_step000123.png``.
        max_versions: in versioned mode, keep only the newest ``max_versions`` files (by step) per layer
            and figure; ``None`` keeps all.

    Raises:
        ValueError: for an unknown mode or ``max_versions < 1``.
    """

    def __init__(
        self,
        root: str | Path,
        mode: Literal["overwrite", "versioned"] = "overwrite",
        max_versions: int | None = None,
    ) -> None:
        if mode not in ("overwrite", "versioned"):
            raise ValueError(f"mode must be 'overwrite' or 'versioned', got {mode!r}")
        if max_versions is not None and max_versions < 1:
            raise ValueError(f"max_versions must be >= 1 or None, got {max_versions}")
        self.root = Path(root)
        self.mode = mode
        self.max_versions = max_versions
        self.disabled = False
        self.last_error: str | None = None
        self.written = 0
        self._escaped: set[str] = set()
        self._lock = threading.Lock()
        # (layer, figure) -> (step, png) of the last two figures written: the one before may be needed as
        # `_before` when a finding arrives after a later figure step (figures are drawn while training goes on)
        self._recent: dict[tuple[str, str], list[tuple[int, bytes]]] = {}
        self._before_step: dict[str, int] = {}  # layer -> step of its first non-finite/exploding finding
        self._kept: dict[tuple[str, str], int] = {}  # (layer, figure) -> step its `_before` file shows
        self._shown: dict[tuple[str, str], int] = {}  # (layer, figure) -> step `<figure>.png` shows (overwrite)
        # the figure index: (layer, figure, tag, file name) -> step the file shows (see :meth:`index`)
        self._index: dict[tuple[str, str, str, str], int] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def path_for(self, layer: str, figure: str, step: int) -> Path:
        """The file a figure goes to (not checked against ``root``; :meth:`write_png` checks).

        Args:
            layer: module path.
            figure: figure name.
            step: global step (used in versioned mode).

        Returns:
            The destination path.
        """
        return self.root / safe_name(layer) / figure_file(figure, step=step if self.mode == "versioned" else None)

    def write_png(self, layer: str, figure: str, png: bytes, step: int) -> Path | None:
        """Write one PNG; on ``OSError`` warn once, disable disk output and return ``None``.

        Args:
            layer: module path (sanitised with :func:`safe_name`).
            figure: figure name (``"activations"``, ``"gradients"``, ``"histograms"``, ``"timeline"``).
            png: PNG bytes.
            step: global step.

        Returns:
            The written path, or ``None`` when disk output is disabled or failed.
        """
        if self.disabled:
            return None
        with self._lock:
            try:
                path = self.path_for(layer, figure, step)
                self.root.mkdir(parents=True, exist_ok=True)
                root = self.root.resolve()
                parent = path.parent.resolve()
                if parent.parent != root:  # a symlinked layer directory pointing elsewhere
                    self._warn_escape(layer, parent)
                    return None
                parent.mkdir(exist_ok=True)
                target = parent / path.name
                key, step = (layer, figure), int(step)
                # the flight recorder's figures of a step that fired arrive after later figures: they go to
                # `<figure>_at.png` and never overwrite a newer `<figure>.png`
                if self._before_step.get(layer) == step:
                    self._write_locked(layer, figure, "at", parent, png, step)
                if self.mode == "versioned" or step >= self._shown.get(key, -1):
                    self._write_locked(layer, figure, "", parent, png, step, target.name)
                    self._shown[key] = step
                recent = self._recent.setdefault(key, [])
                recent[:] = sorted(recent + [(step, png)], key=lambda sp: sp[0])[-2:]
                if layer in self._before_step:
                    self._keep_locked(layer, figure, parent)
                self.written += 1
                if self.mode == "versioned" and self.max_versions is not None:
                    self._prune(parent, safe_name(figure))
                return target
            except OSError as exc:
                self._disable(exc)
                return None

    def keep_before(self, layer: str, step: int) -> None:
        """Keep the layer's last figures drawn before ``step`` as ``<figure>_before.png``: the last readable
        picture before a non-finite or exploding finding, which later figures would overwrite. The first such
        step of a layer counts; figures still being drawn are kept as they arrive."""
        if self.disabled or layer in self._before_step:
            return
        with self._lock:
            self._before_step[layer] = int(step)
            for (lay, fig) in list(self._recent):
                if lay == layer:
                    try:
                        self._keep_locked(layer, fig, self.path_for(layer, fig, 0).parent)
                    except OSError:
                        continue

    def _keep_locked(self, layer: str, figure: str, directory: Path) -> None:
        limit = self._before_step[layer]
        older = [(st, png) for st, png in self._recent.get((layer, figure), []) if st < limit]
        if not older or self._kept.get((layer, figure), -1) >= older[-1][0]:
            return
        self._write_locked(layer, figure, "before", directory, older[-1][1], older[-1][0])
        self._kept[(layer, figure)] = older[-1][0]

    def _write_locked(self, layer: str, figure: str, tag: str, directory: Path, png: bytes, step: int,
                      name: str | None = None) -> None:
        name = name or figure_file(figure, tag=tag)
        atomic_write_bytes(directory / name, png)
        self._index[(layer, figure, tag, name)] = int(step)

    def index(self) -> list[dict[str, Any]]:
        """Every figure file written (and not pruned): ``{layer, figure, tag, step, file}``, ``file`` relative to
        ``root``; ``tag`` is ``""`` (a routine figure), ``"at"`` (the step that fired) or ``"before"``."""
        with self._lock:
            rows = [{"layer": layer, "figure": figure, "tag": tag, "step": step,
                     "file": f"{safe_name(layer)}/{name}"} for (layer, figure, tag, name), step in self._index.items()]
        return sorted(rows, key=lambda r: (r["layer"], r["figure"], r["tag"], r["step"]))

    def _warn_escape(self, layer: str, parent: Path) -> None:
        if layer in self._escaped:
            return
        self._escaped.add(layer)
        warnings.warn(
            f"lit_probe: not writing figures of {layer!r}: its directory resolves to {str(parent)!r}, "
            f"outside {str(self.root)!r} (symlink?)",
            RuntimeWarning,
            stacklevel=3,
        )

    def _prune(self, directory: Path, figure: str) -> None:
        """Delete the oldest versions (by step) beyond ``max_versions``."""
        pattern = re.compile(rf"^{re.escape(figure)}_step(\d+)\.png$")
        versions = []
        for entry in os.scandir(directory):
            m = pattern.match(entry.name)
            if m:
                versions.append((int(m.group(1)), entry.path))
        versions.sort()
        assert self.max_versions is not None
        for _, p in versions[: max(0, len(versions) - self.max_versions)]:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
            gone = os.path.basename(p)
            for key in [k for k in self._index if k[3] == gone and safe_name(k[0]) == os.path.basename(directory)]:
                del self._index[key]

    def _disable(self, exc: OSError) -> None:
        self.disabled = True
        self.last_error = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"lit_probe: cannot write figures under {str(self.root)!r} ({self.last_error}); "
            "figure output to disk is disabled for the rest of this run, training continues.",
            RuntimeWarning,
            stacklevel=3,
        )
        log.warning("lit_probe: disk figure output disabled: %s", self.last_error)


# ----------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------
def _png_to_pil(png: bytes):
    from PIL import Image  # pillow is a matplotlib dependency

    img = Image.open(io.BytesIO(png))
    img.load()
    return img.convert("RGB")


def _is_wandb_logger(obj: Any) -> bool:
    return type(obj).__name__ == "WandbLogger"


def _is_tensorboard_logger(obj: Any) -> bool:
    return type(obj).__name__ == "TensorBoardLogger"


class WandbSink:
    """Log figures to Weights & Biases at the trainer's global step.

    With a Lightning ``WandbLogger`` images go through ``logger.log_image(key=..., images=[...],
    step=step)``, which records ``trainer/global_step`` as a field (the logger's step metric) instead of
    wandb's own ``step=``, so nothing is dropped after a resume. With a bare run it calls
    ``run.log({key: wandb.Image(...), "trainer/global_step": step})``. Keys are ``probe/<layer>/<figure>``.

    ``defer=True`` only queues images in :meth:`write_png` (safe from the render thread) and logs them
    in :meth:`flush`, one ``log`` call per step holding every queued image: call ``flush`` from the
    training thread so W&B is only ever called from that thread and each log step adds one history row.

    Args:
        logger_or_run: a ``WandbLogger`` (has ``.experiment`` and ``.log_image``) or a ``wandb`` Run.
        defer: queue images until :meth:`flush` instead of logging them immediately.
    """

    def __init__(self, logger_or_run: Any, defer: bool = False) -> None:
        self.target = logger_or_run
        self.is_logger = hasattr(logger_or_run, "log_image") and hasattr(logger_or_run, "experiment")
        self.defer = defer
        self._lock = threading.Lock()
        self._queued: dict[int, dict[str, Any]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_lock", None)
        state["_queued"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @staticmethod
    def key(layer: str, figure: str) -> str:
        """The W&B key of a figure: ``probe/<layer>/<figure>``."""
        return f"probe/{layer}/{figure}"

    def write_png(self, layer: str, figure: str, png: bytes, step: int) -> None:
        """Log (or, with ``defer``, queue) one image.

        Args:
            layer: module path.
            figure: figure name.
            png: PNG bytes.
            step: the trainer's global step.
        """
        img = _png_to_pil(png)
        key = self.key(layer, figure)
        if self.defer:
            with self._lock:
                self._queued.setdefault(int(step), {})[key] = img
            return
        self._log({key: img}, int(step))

    def flush(self) -> None:
        """Log every queued image, one ``log`` call per step, oldest step first."""
        with self._lock:
            queued, self._queued = self._queued, {}
        for step in sorted(queued):
            self._log(queued[step], step)

    def _log(self, images: dict[str, Any], step: int) -> None:
        import wandb

        if self.is_logger:
            if len(images) == 1:
                ((key, img),) = images.items()
                self.target.log_image(key=key, images=[img], step=step)
            else:
                self.target.log_metrics({k: wandb.Image(v) for k, v in images.items()}, step=step)
            return
        payload: dict[str, Any] = {k: wandb.Image(v) for k, v in images.items()}
        payload["trainer/global_step"] = step
        self.target.log(payload)

    def write_findings(self, rows: list[dict], step: int) -> None:
        """Log findings as a ``wandb.Table`` under ``probe/findings``.

        Args:
            rows: one dict per finding (columns are the union of keys, in first-seen order; values that
                are not str/int/float/bool/None are converted to str).
            step: the trainer's global step.
        """
        import wandb

        columns: list[str] = []
        for row in rows:
            for k in row:
                if k not in columns:
                    columns.append(str(k))

        def cell(v: Any) -> Any:
            return v if v is None or isinstance(v, (str, int, float, bool)) else str(v)

        data = [[cell(row.get(c)) for c in columns] for row in rows]
        for j in range(len(columns)):  # a W&B table column has one type: a "nan" among numbers makes it text
            kinds = {type(r[j]) for r in data if r[j] is not None}
            if str in kinds and len(kinds) > 1:
                for r in data:
                    r[j] = None if r[j] is None else str(r[j])
        if not columns:
            columns, data = ["message"], []
        if self.is_logger and hasattr(self.target, "log_table"):
            self.target.log_table(key="probe/findings", columns=columns, data=data, step=step)
        else:
            self.target.log({"probe/findings": wandb.Table(columns=columns, data=data),
                             "trainer/global_step": step})


class TensorBoardSink:
    """Add figures to a Lightning ``TensorBoardLogger``'s ``SummaryWriter`` as HWC uint8 images.

    The writer is fetched once, in the constructor (call it on the training thread: Lightning creates
    the ``SummaryWriter`` lazily and must not do so from two threads). ``SummaryWriter.add_image`` is
    thread-safe (it only enqueues an event).

    Args:
        logger: a ``TensorBoardLogger`` (``logger.experiment`` is a ``SummaryWriter``) or a
            ``SummaryWriter`` itself.
    """

    def __init__(self, logger: Any) -> None:
        self.logger = logger
        self.writer = logger.experiment if hasattr(logger, "experiment") else logger

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["writer"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def write_png(self, layer: str, figure: str, png: bytes, step: int) -> None:
        """Add one image under ``probe/<layer>/<figure>``.

        Args:
            layer: module path.
            figure: figure name.
            png: PNG bytes.
            step: the trainer's global step.
        """
        import numpy as np

        if self.writer is None:
            self.writer = self.logger.experiment if hasattr(self.logger, "experiment") else self.logger
        arr = np.asarray(_png_to_pil(png), dtype=np.uint8)
        self.writer.add_image(f"probe/{layer}/{figure}", arr, global_step=int(step), dataformats="HWC")

    def flush(self) -> None:
        """Flush the ``SummaryWriter`` (so readers see the events)."""
        if self.writer is not None and hasattr(self.writer, "flush"):
            self.writer.flush()


def image_sinks_for(
    loggers: Sequence[Any], *, log_to_wandb: bool = True, defer_wandb: bool = False
) -> tuple[list, list[str]]:
    """Build image sinks for a trainer's loggers.

    ``WandbLogger`` -> :class:`WandbSink`, ``TensorBoardLogger`` -> :class:`TensorBoardSink` (matched
    by class name, so lightning is never imported). Without a ``WandbLogger`` but with an active
    ``wandb.run`` in an already imported ``wandb`` module, that run is used. Other loggers (CSV, ...)
    cannot show images and are skipped.

    Args:
        loggers: ``trainer.loggers``.
        log_to_wandb: build W&B sinks at all.
        defer_wandb: build :class:`WandbSink` with ``defer=True`` (then call its ``flush()`` -- e.g.
            ``FigureRenderer.flush_sinks()`` -- from the training thread on log steps).

    Returns:
        ``(sinks, info_messages)``; the messages say what is not pushed where (log them once).
    """
    sinks: list = []
    info: list[str] = []
    have_wandb = False
    for lg in loggers or []:
        if _is_wandb_logger(lg):
            if log_to_wandb:
                sinks.append(WandbSink(lg, defer=defer_wandb))
                have_wandb = True
            else:
                info.append("log_to_wandb=False: figures are not pushed to W&B")
        elif _is_tensorboard_logger(lg):
            try:
                sinks.append(TensorBoardSink(lg))
            except Exception as exc:  # e.g. tensorboard not installed
                info.append(
                    f"TensorBoard logger present but not usable for images ({type(exc).__name__}: {exc})"
                )
    if log_to_wandb and not have_wandb:
        wandb_mod = sys.modules.get("wandb")
        run = getattr(wandb_mod, "run", None) if wandb_mod is not None else None
        if run is not None:
            sinks.append(WandbSink(run, defer=defer_wandb))
            info.append("no WandbLogger: figures are pushed to the active wandb.run")
        else:
            info.append("no W&B run: figures are not pushed to W&B")
    return sinks, info

"""An output folder that can never destroy its input or a previous result.

:class:`OutputFolder` is how ``quant-export quantize`` writes a checkpoint folder:

* :func:`check_output` runs before any work (before calibration): ``--output`` must not be the
  model folder, inside it or a folder that holds it; it must not be a file; its parent must exist
  and be writable; a non-empty folder that this tool did not write (no :data:`MARKER` file, e.g.
  another model's shards, index and README), or that holds a result of another kind (a Hugging
  Face checkpoint where a TensorRT-LLM one is asked for), is refused unless ``overwrite`` is given.
* Every file is written into ``checkpoint/`` inside a private temporary sibling folder
  (``.<name>.<pid>.<random>.quant-tmp``, see :mod:`quant_core.atomic`; an exporter's own staging
  folder lands inside it too, and a run killed at any point leaves only that one folder, which the
  next run removes). The checkpoint is checked there and then swapped in with one rename: ``renameat2(RENAME_EXCHANGE)`` on Linux exchanges the old and the new folder atomically,
  so a reader (or a ``kill -9`` at any moment) sees either the whole previous folder or the whole
  new one, never a mix. Where the exchange is not available (not Linux, or a file system without
  it), the old folder is first renamed to ``.<name>.previous-<pid>`` and the new one renamed into
  place; that name is never removed automatically, so a kill between the two renames loses
  nothing.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
from pathlib import Path

from quant_core.atomic import atomic_temp

__all__ = [
    "MARKER",
    "TOKENIZER_FILES",
    "OutputFolder",
    "check_output",
    "copy_serving_files",
    "exchange_paths",
]

MARKER = ".quant-export.json"  # written into every folder this tool writes
# files a server or AutoTokenizer reads beside the weights (copied from the model folder)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _listing(folder: Path) -> list[str]:
    try:
        return sorted(p.name for p in folder.iterdir())
    except OSError:
        return []


def _marker_kind(folder: Path) -> str | None:
    """The ``kind`` recorded in ``folder``'s :data:`MARKER`; None without a readable marker."""
    try:
        record = json.loads((folder / MARKER).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return str(record.get("kind")) if isinstance(record, dict) else None


def check_output(
    output: str | os.PathLike[str], model_dir: Path | None, overwrite: bool, kind: str
) -> Path:
    """``output`` as an absolute Path, after refusing every target that would destroy data (SystemExit, one line).

    ``kind`` names what will be written (a layout); a previous result of the same kind is
    replaced, one of another kind (or a folder this tool did not write) only with ``overwrite``.
    """
    output = Path(output).absolute()
    resolved = output.resolve()
    if model_dir is not None:
        model = Path(model_dir).resolve()
        if _is_within(resolved, model):
            raise SystemExit(
                f"--output {output} is the --model folder or inside it; writing there would "
                "overwrite the model being read: choose a folder outside it"
            )
        if _is_within(model, resolved):
            raise SystemExit(
                f"--output {output} holds the --model folder {model_dir}; replacing it would delete "
                "the model: choose another folder"
            )
    if output.exists() and not output.is_dir():
        raise SystemExit(f"--output {output} is a file, not a folder: give a folder path")
    if not output.parent.is_dir():
        raise SystemExit(
            f"--output {output}: folder {output.parent} does not exist; create it first"
        )
    if overwrite or not output.is_dir() or not _listing(output):
        return output
    previous = _marker_kind(output)
    if previous is None:
        shown = ", ".join(_listing(output)[:4])
        raise SystemExit(
            f"--output {output} already holds files this tool did not write ({shown}, ...); "
            "choose an empty or new folder, or pass --overwrite to replace it"
        )
    if previous != kind:
        raise SystemExit(
            f"--output {output} holds a {previous} checkpoint; writing a {kind} one would replace "
            "it: choose another folder, or pass --overwrite"
        )
    return output


def copy_serving_files(model_dir: Path, target: Path) -> list[str]:
    """Copy the tokenizer, chat template and generation config of ``model_dir`` into ``target``.

    A file already in ``target`` (an exporter's ``generation_config.json``) is kept. Returns the
    names copied.
    """
    copied = []
    for name in TOKENIZER_FILES:
        source, dest = model_dir / name, target / name
        if source.is_file() and not dest.exists():
            shutil.copyfile(source, dest)
            copied.append(name)
    return copied


def exchange_paths(a: Path, b: Path) -> bool:
    """Atomically exchange two paths with Linux ``renameat2(RENAME_EXCHANGE)``; False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the symbols of this process, libc's included
        renameat2 = libc.renameat2
    except (OSError, AttributeError, TypeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system cannot exchange
        return False
    raise OSError(errno, os.strerror(errno), str(b))


PROGRESS = "progress.json"  # a resumable run's record of the parts written (see quantize --resume)


def partial_folder(output: Path) -> Path:
    """The folder a resumable run of ``output`` works in, kept when it is interrupted."""
    return output.with_name(f".{output.name}.quant-partial")


class OutputFolder:
    """A staging folder beside ``output`` that becomes ``output`` in one rename (:meth:`publish`).

    Create it after :func:`check_output` and before any long work: creating the staging folder is
    the check that the parent is writable. Use as a context manager; on an error the staging
    folder is removed and ``output`` is untouched. ``resumable`` works in the fixed
    :func:`partial_folder` instead, kept on an error once it holds a :data:`PROGRESS` record (so
    ``resume`` can go on from it; without ``resume`` an earlier one is removed first).
    """

    def __init__(self, output: Path, *, resumable: bool = False, resume: bool = False) -> None:
        self.output = Path(output)
        self.resumable = resumable
        try:
            if resumable:
                self.work = partial_folder(self.output)
                if self.work.exists() and not resume:
                    shutil.rmtree(self.work)  # an earlier interrupted run: start over
                elif resume and not (self.work / PROGRESS).is_file():
                    raise SystemExit(
                        f"--resume: no interrupted run of --output {self.output} to go on from "
                        f"({self.work} holds none); run without --resume"
                    )
                self.work.mkdir(exist_ok=True)
            else:
                self.work = atomic_temp(self.output, directory=True)
        except OSError as err:
            raise SystemExit(
                f"--output {self.output}: cannot write in {self.output.parent} ({err.strerror}); "
                "choose a writable folder"
            ) from None
        self.staging = self.work / "checkpoint"
        self.staging.mkdir(exist_ok=True)
        self.published = False

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        # a resumable run that finished a layer keeps its folder (no config.json: nothing loads it)
        if not (self.resumable and (self.work / PROGRESS).is_file()) or self.published:
            shutil.rmtree(self.work, ignore_errors=True)

    def publish(self, record: dict[str, object]) -> Path:
        """Write :data:`MARKER` (holding ``record``) and swap the staging folder in as ``output``."""
        (self.staging / MARKER).write_text(json.dumps(record, indent=2), encoding="utf-8")
        if not self.output.exists():
            os.rename(self.staging, self.output)
        elif not exchange_paths(
            self.staging, self.output
        ):  # the exchange leaves the old one in work
            previous = self.output.with_name(f".{self.output.name}.previous-{os.getpid()}")
            os.rename(self.output, previous)
            os.rename(self.staging, self.output)
            shutil.rmtree(previous)
        self.published = True
        shutil.rmtree(self.work, ignore_errors=True)
        return self.output

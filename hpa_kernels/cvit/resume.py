"""What a killed ``hpa-cvit`` run leaves behind, and how ``--resume`` continues from it.

Every output is written atomically (a uniquely named temporary file in its folder, then
``os.replace``). Checkpoints go to ``<out>/checkpoints/``: ``stage0.pt`` after the safety
alignment (the aligned weights, its evaluation, the calibration set) and ``<method>.pt`` after
each finished task of each method (the weights, the rows measured so far, the RNG states).
``--resume`` continues from there with the same final numbers as a run that was never killed:
every task reseeds torch and draws its batches from its own seeded generator, and the optimizer
is built anew for each task, so the weights, the rows and the RNG states are the whole state. A
run without ``--resume`` starts over and clears the checkpoints; a complete run removes them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

import torch


class ResumeError(ValueError):
    """``--resume`` cannot continue: no checkpoint, or one written with other arguments."""


# Arguments that cannot change the numbers, left out of the configuration ``--resume`` compares.
_RESUME_IGNORED = ("out", "resume", "stop_after_task", "no_progress", "argv")


class Checkpoints:
    """The checkpoints of one run in ``out/checkpoints/``: ``config.json`` (the arguments, less
    ``--out``, ``--resume``, ``--no-progress``), ``stage0.pt`` and one ``<method>.pt`` per method.

    Without ``args.resume`` the previous checkpoints are cleared and the configuration is written;
    with it the saved configuration must equal the current one.

    Raises:
        ResumeError: ``--resume`` and no checkpoint, or a different configuration (one line,
            naming the arguments that differ).
    """

    def __init__(self, out: Path, args: argparse.Namespace) -> None:
        self.dir = Path(out) / "checkpoints"
        self.stop_after = getattr(args, "stop_after_task", None)
        self.finished = 0  # method tasks finished so far (restored ones included)
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in _RESUME_IGNORED}
        config_path = self.dir / "config.json"
        if getattr(args, "resume", False):
            if not config_path.is_file():
                raise ResumeError(f"--resume: no checkpoint in {self.dir} (nothing to resume)")
            try:
                saved = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ResumeError(f"--resume: unreadable {config_path}: {exc}") from None
            if saved != config:
                diff = sorted(set(saved) | set(config), key=str)
                diff = [
                    f"--{k.replace('_', '-')} {saved.get(k)!r} then, {config.get(k)!r} now"
                    for k in diff
                    if saved.get(k) != config.get(k)
                ]
                raise ResumeError(
                    f"--resume: {self.dir} was written with other arguments ({'; '.join(diff)}); "
                    "rerun with the same arguments or without --resume"
                )
        else:
            self.clear()
            write_json_atomic(config, config_path)

    def load(self, name: str) -> dict | None:
        """The checkpoint ``name`` (``stage0`` or a method), or None if there is none."""
        path = self.dir / f"{name}.pt"
        if not path.is_file():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    def save(self, name: str, state: dict) -> None:
        """Write the checkpoint ``name`` atomically."""
        self.dir.mkdir(parents=True, exist_ok=True)
        replace_atomic(self.dir / f"{name}.pt", lambda tmp: torch.save(state, tmp))

    def task_done(self) -> None:
        """Count a finished (and checkpointed, or restored) method task; the testing stop."""
        self.finished += 1
        self.maybe_stop()

    def maybe_stop(self) -> None:
        if self.stop_after is not None and self.finished >= self.stop_after:
            print(
                f"hpa-cvit: stopped after {self.finished} task(s) (--stop-after-task, a testing aid)", file=sys.stderr
            )
            raise SystemExit(3)

    def clear(self) -> None:
        """Remove this run's checkpoint files (and the folder, once empty)."""
        if not self.dir.is_dir():
            return
        for path in [*self.dir.glob("*.pt"), self.dir / "config.json"]:
            path.unlink(missing_ok=True)
        try:
            self.dir.rmdir()
        except OSError:  # something else lives there: leave it
            pass


def write_json_atomic(obj: dict, path: Path) -> Path:
    """``json.dump`` to ``path`` through a temporary file and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return replace_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1), encoding="utf-8"))


def replace_atomic(path: Path, write) -> Path:
    """``write(tmp)`` to a uniquely named ``.<name>.*.tmp`` next to ``path`` (two runs sharing a
    folder never collide), flush it to disk, then ``os.replace`` it onto ``path``: ``path`` holds
    the old or the new content, never a part. The temporary file is removed on any failure."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as f:
        tmp = Path(f.name)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def rng_state() -> dict:
    """torch's (CPU and CUDA) and Python's global RNG states."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])

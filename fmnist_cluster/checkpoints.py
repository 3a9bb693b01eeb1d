"""Training checkpoints, so that a training cut off (an interrupted sweep, a machine lost, a crashed
worker) goes on from its last finished epoch when the same trial runs again, anywhere the folder is.

A training is named by its :meth:`TrialConfig.training_key` (the settings that decide its weights),
so every trial that can share a training finds it. After every epoch the autoencoder (weights and
the optimizer's state, Keras' ``.keras`` format) and what the trials have gathered so far (the loss
history, ``eval_every`` scores, their timing) are written to ``<root>/<training key>/``; the epochs
that some trial of the group ends at are kept, other epochs only while they are the latest (a later
run whose shortest open trial ends earlier resumes from the last kept epoch before it). Each
checkpoint is written under a temporary name and moved into place, its JSON last: a checkpoint
whose JSON is there is whole. The folder is removed once every trial of the group has finished.

A resumed training goes on exactly as an unbroken one (same CPU kind): the weights and optimizer state
are the checkpoint's, and the order of every later epoch does not depend on where the training
started (``shuffle: once`` trains every epoch in the one order Keras draws from the seed; ``shuffle:
epoch`` draws each epoch's from the seed and the epoch). Runs record where they resumed
(``info.resumed_from_epoch``, tag ``fmc.resumed_from_epoch``) and, since a copy of the folder can
go on on another machine, which CPU trained which epochs (the checkpoint's ``epoch_cpus``;
``info.trained_on``, tag ``fmc.trained_on``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

class CheckpointError(RuntimeError):
    """A training checkpoint that is there but cannot be read."""


_NAME = re.compile(r"epoch-(\d{4,})\.json")


class TrainingCheckpoints:
    """The checkpoints of one training under ``root``."""

    def __init__(self, root: str | os.PathLike, training_key: str):
        self.folder = Path(root) / training_key
        self.failed = False  # a save failed (warned once)

    def epochs(self) -> list[int]:
        """Epochs with a whole checkpoint, in order."""
        if not self.folder.is_dir():
            return []
        found = (_NAME.fullmatch(p.name) for p in self.folder.iterdir())
        return sorted(int(m.group(1)) for m in found if m and (self.folder / f"epoch-{int(m.group(1)):04d}.keras").exists())

    def latest(self, at_most: int) -> int | None:
        """The last epoch saved that is not beyond ``at_most``; None when there is none."""
        usable = [e for e in self.epochs() if e <= at_most]
        return usable[-1] if usable else None

    def save(self, epoch: int, autoencoder, state: dict[str, Any], keep: set[int]) -> None:
        """Write the checkpoint of ``epoch``; drop earlier ones that are not in ``keep``. A checkpoint
        that cannot be written (a full disk) is warned about once and the training goes on without it."""
        model, meta = self._paths(epoch)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            partial = model.with_name(f".{model.name}.partial.keras")  # Keras wants the .keras suffix
            autoencoder.save(partial)
            os.replace(partial, model)
            tmp = meta.with_name(f".{meta.name}.partial")
            tmp.write_text(json.dumps({"epoch": epoch, **state}))
            os.replace(tmp, meta)  # the JSON last: from here on the checkpoint counts
        except OSError as error:
            if not self.failed:
                warnings.warn(f"training checkpoint {model} not written ({error}); the training goes on, "
                              "and a resume starts from the last checkpoint written", stacklevel=2)
            self.failed = True
            return
        for old in self.epochs():
            if old < epoch and old not in keep:
                for path in self._paths(old)[::-1]:
                    path.unlink(missing_ok=True)

    def load(self, epoch: int) -> tuple[Any, dict[str, Any]]:
        """``(autoencoder, state)`` of the checkpoint of ``epoch``: compiled, its optimizer's state restored."""
        from fmnist_cluster.quiet import quiet_import

        keras = quiet_import("keras")
        model, meta = self._paths(epoch)
        try:
            return keras.saving.load_model(model), json.loads(meta.read_text())
        except Exception as error:  # noqa: BLE001 - said with the folder to remove
            raise CheckpointError(f"the training checkpoint {model} cannot be read ({type(error).__name__}: "
                                  f"{' '.join(str(error).split())[:300]}); remove {self.folder} to train from the "
                                  "start") from error

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def _paths(self, epoch: int) -> tuple[Path, Path]:
        return self.folder / f"epoch-{epoch:04d}.keras", self.folder / f"epoch-{epoch:04d}.json"

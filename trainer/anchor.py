"""DPO's reference: a pinned anchor, not the policy of the moment (measured against itself, a
window's DPO loss is ln 2 at its first step and β does nothing).

Which version is the anchor is a pure function of the role's newest checkpoint (``resolve``):

- none yet: the base model;
- an SFT or cold-start version (``ANCHOR_STEPS``): that version;
- a DPO version: the anchor its manifest names, with the DPO windows trained against it since it
  was pinned; once that count reaches ``anchor_refresh_windows`` (0: never), the newest version
  itself.

Every DPO checkpoint names its anchor in its manifest (``anchor``: path, version, windows), so a
restarted trainer takes the same one, and the store never prunes a folder a kept checkpoint names
as its anchor (trainer/checkpoints.py).

Its log-probs are computed without grad: for a LoRA policy on the anchor's base, with the adapter
disabled (the anchor is the base) or from a second, frozen adapter on the same model (no second
copy of the base); otherwise from a frozen model of its own, loaded in the trainer's dtype and
kept while it stays the anchor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.checkpoints import Checkpoint

if TYPE_CHECKING:
    from trainer.role_models import RoleModel

log = logging.getLogger(__name__)

ANCHOR_STEPS = frozenset({"sft", "cold_start"})
ANCHOR_ADAPTER = "anchor"  # the frozen adapter's name on a LoRA policy


@dataclass(frozen=True)
class Anchor:
    path: str  # a model or adapter folder
    version: str  # "<role>/v0003-sft", or "<role>/base"
    windows: int = 0  # DPO windows trained against it so far

    def manifest(self) -> dict[str, Any]:
        """The ``anchor`` entry of the manifest of a version trained one more window on it."""
        return {"anchor": {**asdict(self), "windows": self.windows + 1}}


def resolve(newest: Checkpoint | None, role: str, base_path: str, refresh_windows: int) -> Anchor:
    """The anchor of the next DPO window of a role whose newest checkpoint is ``newest``."""
    if newest is None:
        return Anchor(base_path, f"{role}/base")
    own = Anchor(str(newest.path), newest.version_string)
    named = newest.metadata.get("anchor")
    if newest.step in ANCHOR_STEPS or not isinstance(named, dict):
        return own  # an SFT version, or a DPO version from before anchors: itself
    anchor = Anchor(str(named["path"]), str(named["version"]), int(named.get("windows", 0)))
    if refresh_windows and anchor.windows >= refresh_windows:
        return own
    if not Path(anchor.path).is_dir():
        log.warning("%s: anchor %s is gone: re-pinned", newest.version_string, anchor.path)
        return own
    return anchor


class AnchorModels:
    """The anchor's log-probs next to a policy: computes ``logps(model)`` on the model that
    holds the anchor's weights."""

    def __init__(self, dtype: str, device: str):
        self.dtype, self.device = dtype, device
        self._frozen: tuple[str, Any] | None = None  # (path, model) of a separate anchor

    def logps(self, rm: RoleModel, anchor: Anchor, compute: Callable[[Any], Any]) -> Any:
        import torch

        from llm.backends.base import adapter_base

        model = rm.model
        own = rm.checkpoint is not None and str(rm.checkpoint.path) == anchor.path
        peft = hasattr(model, "peft_config")
        with torch.no_grad():
            if own or (rm.checkpoint is None and anchor.path == rm.base_path and not peft):
                return compute(model)  # the policy is the anchor (before it trains)
            if peft and anchor.path == rm.base_path:
                with model.disable_adapter():
                    return compute(model)
            if peft and adapter_base(anchor.path) == rm.base_path:
                self._load_adapter(model, anchor.path)
                model.set_adapter(ANCHOR_ADAPTER, inference_mode=True)
                try:
                    return compute(model)
                finally:
                    model.set_adapter("default")  # trainable again
            return compute(self._separate(anchor.path))

    def _load_adapter(self, model: Any, path: str) -> None:
        loaded = getattr(model, "_promptcot_anchor_path", None)
        if loaded == path:
            return
        if ANCHOR_ADAPTER in model.peft_config:
            model.delete_adapter(ANCHOR_ADAPTER)
        model.load_adapter(path, adapter_name=ANCHOR_ADAPTER, is_trainable=False)
        model._promptcot_anchor_path = path

    def _separate(self, path: str) -> Any:
        """A frozen model of its own (a full fine-tuned policy's anchor), kept while it stays
        the anchor."""
        if self._frozen is not None and self._frozen[0] == path:
            return self._frozen[1]
        self._frozen = None  # the old one goes before the new one loads
        from trainer.role_models import load_frozen

        model = load_frozen(path, self.dtype, self.device)
        self._frozen = (path, model)
        return model

"""Trainer settings: one settings section the root settings compose
(``settings.trainer``), with a config per training step.

Defaults follow the paper (cold start lr 2e-5, EM steps lr 2e-6, DPO lr 1e-6, batch 16) but keep
windows small: training the embedded SmolLM2-135M on a CPU takes seconds per step, and a window
that is too big holds its Kafka batch for a long time. Every step can be switched off.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from streams.settings import Section


class LoraConfig(Section):
    """peft LoRA shape, used when a step sets ``use_lora``."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"


class StepConfig(Section):
    """What every training step shares. ``lr`` is for full fine-tuning; LoRA usually wants a
    learning rate ~10-100x higher (set it explicitly when you switch ``use_lora`` on)."""

    enabled: bool = True
    lr: float = 2e-6
    batch_size: int = 16  # effective batch (per-device batch x gradient accumulation)
    per_device_batch_size: int = 4  # memory knob; accumulation makes up the rest
    epochs: float = 1.0
    max_seq_len: int = 1024
    use_lora: bool = False
    lora: LoraConfig = Field(default_factory=LoraConfig)
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0

    @property
    def grad_accum(self) -> int:
        return max(1, self.batch_size // max(1, self.per_device_batch_size))


class WindowConfig(Section):
    """The smallest window worth a training run. The window itself is the runtime's micro-batch
    of the stage: ``settings.stages["em"|"dpo"]`` (batch_size records or batch_within_s)."""

    min_records: int = 8


class ColdStartConfig(StepConfig):
    """SFT of both models on annotated (c, z, x) triples (paper: lr 2e-5, batch 16, 2 epochs)."""

    lr: float = 2e-5
    epochs: float = 2.0


class EStepConfig(StepConfig):
    """Best-of-K rejection fine-tuning of q_φ on (c, x) -> z_best (paper: lr 2e-6, batch 16).
    Its window is the EM window: the stage runs the E-step and then the M-step on it."""

    lr: float = 2e-6
    window: WindowConfig = Field(default_factory=WindowConfig)
    min_seeds: int = 1  # distinct seeds a window needs after best-of-K


class MStepConfig(StepConfig):
    """Fine-tune p_θ on c -> (z, x), z decoded greedily from the updated q_φ."""

    lr: float = 2e-6
    max_rationale_tokens: int = 192  # greedy decode budget for z
    generation_batch_size: int = 8


class DPOConfig(StepConfig):
    """Self-play DPO of the solver on preference pairs (paper: lr 1e-6, batch 16)."""

    lr: float = 1e-6
    beta: float = 0.1
    window: WindowConfig = Field(default_factory=lambda: WindowConfig(min_records=4))


class TrainerSettings(Section):
    """``settings.trainer``."""

    enabled: bool = True  # master switch: False makes every trainer stage skip its windows
    checkpoint_dir: Path = Path("promptcot-output/checkpoints")
    # Checkpoints kept per role (older ones are pruned after each save). Full SmolLM2 folders are
    # ~540 MB in float32 (bf16 would round EM-sized updates away); LoRA adapters are small.
    keep_last: int = 2
    heldout_fraction: float = 0.1  # seeds (by id hash) never trained on: the convergence signal
    torch_threads: int | None = None  # None: leave torch's default
    seed: int = 0
    cold_start: ColdStartConfig = Field(default_factory=ColdStartConfig)
    e_step: EStepConfig = Field(default_factory=EStepConfig)
    m_step: MStepConfig = Field(default_factory=MStepConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)

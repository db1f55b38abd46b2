"""Cold start and the EM loop for the prompt model p_θ(z, x | c) and the rationale model
q_φ(z | c, x) (docs/architecture.md, "The method"; docs/training.md).

- Cold start: SFT of p_θ on c -> (z, x) and of q_φ on (c, x) -> z from annotated seeds.
- E-step: the rationale stage already sampled K rationales per seed and scored each with
  R(z) = log p_θ(x | z, c) + log p_θ(z | c); here we keep the best per seed and fine-tune q_φ on
  (c, x) -> z_best (best-of-K rejection fine-tuning). Signal: the mean reward of q_φ's greedy
  rationale on held-out seeds, before and after.
- M-step: decode z greedily from the updated q_φ for each seed and fine-tune p_θ on c -> (z, x).
  Signal (the paper's convergence signal): mean per-token NLL of x given (c, z) under p_θ on
  held-out seeds, before and after.
- Epochs: every seed of a window is sent round again (``WindowResult.next_epoch``), so EM
  iterates over the seed set; the epoch is part of each sample's id.
- Windows: one under ``e_step.window.min_records`` rationales trains nothing (its seeds still go
  round again, and the versions that trained on its records before are announced again). A
  window's best-of-K choice and its held-out split are made once (``Window``).

A window is idempotent and resumable: what each checkpoint was trained on is in its manifest
(trainer/checkpoints.py, ``TrainedLedger``). A window redelivered after a crash trains only the
steps it had not finished (a kill between the E-step checkpoint and the M-step: the M-step runs)
and announces every version the window produced, old and new.

Training goes through trainer/sft.py (the engine, trainer/engine.py: each role's optimiser
persists across windows and restarts). Prompts and completions come from llm/prompts.py: the
targets are exactly the text the stages generate and score.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from llm.prompts import (
    RATIONALE_MODEL,
    SYNTHESIS,
    ParseError,
    format_concepts,
    parse_rationale,
    rationale_completion,
    synthesis_fields,
    synthesis_parts,
)
from llm.roles import ModelRoles, Role, model_path_for
from streams import memory
from streams.records import AnnotatedSeed, ModelUpdate, Rationale
from trainer.checkpoints import CheckpointStore, TrainedLedger
from trainer.engine import EngineOptions, WindowLosses, continuation_nll
from trainer.heldout import HeldoutPool, is_heldout
from trainer.lineage import role_lineage
from trainer.role_models import RoleModel, load_role_model, save_role_model
from trainer.settings import StepConfig, TrainerSettings
from trainer.sft import Report, StepReport, greedy_decode, sft, torch_module
from trainer.updates import WindowResult, model_update, update_from_manifest

log = logging.getLogger(__name__)

NEXT_EPOCH_ANNOTATOR = "em"  # AnnotatedSeed.annotator of a seed sent round again by the trainer


# ---------------------------------------------------------------------------------------------
# Training examples


@dataclass(frozen=True)
class SeedItem:
    """One seed problem with the rationale to train on (or to condition the NLL on)."""

    seed_id: str
    domain: str
    concepts: list[str]
    difficulty: str
    problem: str
    rationale: str
    source_id: str = ""  # the record the rationale came from (lineage)

    @classmethod
    def from_annotated(cls, seed: AnnotatedSeed) -> SeedItem:
        return cls(
            seed_id=seed.seed_id, rationale=seed.rationale, source_id=seed.id, **seed.payload()
        )

    @classmethod
    def from_rationale(cls, r: Rationale) -> SeedItem:
        # The rationale stage scored R(z) with the seed's difficulty or "": training on the same
        # text keeps the reward and the targets on one format.
        return cls(seed_id=r.seed_id, rationale=r.text, source_id=r.id, **r.payload())

    def with_rationale(self, rationale: str) -> SeedItem:
        return SeedItem(
            self.seed_id,
            self.domain,
            self.concepts,
            self.difficulty,
            self.problem,
            rationale,
            self.source_id,
        )


def synthesis_prompt(tokenizer: Any, item: SeedItem) -> str:
    return SYNTHESIS.render(
        tokenizer, **synthesis_fields(item.concepts, item.difficulty, item.domain)
    )


def prompt_model_example(tokenizer: Any, item: SeedItem) -> dict[str, str]:
    """p_θ: c -> (z, x), the completion exactly as generation produces it after the prefix."""
    z_part, x_part = synthesis_parts(item.rationale, item.problem)
    return {"prompt": synthesis_prompt(tokenizer, item), "completion": z_part + x_part}


def rationale_prompt(tokenizer: Any, item: SeedItem) -> str:
    return RATIONALE_MODEL.render(
        tokenizer, concepts=format_concepts(item.concepts), problem=item.problem
    )


def rationale_model_example(tokenizer: Any, item: SeedItem) -> dict[str, str]:
    """q_φ: (c, x) -> z."""
    return {
        "prompt": rationale_prompt(tokenizer, item),
        "completion": rationale_completion(item.rationale),
    }


# ---------------------------------------------------------------------------------------------
# E-step selection


def best_of_k(rationales: Iterable[Rationale]) -> dict[str, Rationale]:
    """The max-reward rationale per seed. NaN/inf rewards (failed scoring) never win; ties go
    to the lowest sample index, then the id, so a redelivered window picks the same one."""
    best: dict[str, Rationale] = {}
    for r in rationales:
        if not math.isfinite(r.reward):
            continue
        cur = best.get(r.seed_id)
        if cur is None or (-r.reward, r.sample_index, r.id) < (
            -cur.reward,
            cur.sample_index,
            cur.id,
        ):
            best[r.seed_id] = r
    return best


@dataclass(frozen=True)
class Window:
    """A window of scored rationales, read once: the best-of-K rationale per seed, and those
    seeds split into the ones trained on and the held-out ones (never trained on)."""

    rationales: list[Rationale]
    best: dict[str, Rationale]
    train: list[SeedItem]
    heldout: list[SeedItem]

    @classmethod
    def of(cls, rationales: Sequence[Rationale], heldout_fraction: float) -> Window:
        best = best_of_k(rationales)
        train: list[SeedItem] = []
        heldout: list[SeedItem] = []
        for _, r in sorted(best.items()):
            item = SeedItem.from_rationale(r)
            (heldout if is_heldout(item.seed_id, heldout_fraction) else train).append(item)
        return cls(list(rationales), best, train, heldout)

    def part(self, rationales: list[Rationale], heldout_fraction: float) -> Window:
        """The window of some of its rationales (what a step has still to train on when the
        window comes again after a crash): itself when they are all of it."""
        if [r.id for r in rationales] == [r.id for r in self.rationales]:
            return self
        return Window.of(rationales, heldout_fraction)


# ---------------------------------------------------------------------------------------------
# Scoring and decoding with an in-memory HF model


def _problem_given_rationale(
    tokenizer: Any, items: Sequence[SeedItem]
) -> tuple[list[str], list[str]]:
    """(c + z prompts, x continuations) of the items: what the problem NLL scores."""
    prompts, conts = [], []
    for item in items:
        z_part, x_part = synthesis_parts(item.rationale, item.problem)
        prompts.append(synthesis_prompt(tokenizer, item) + z_part)
        conts.append(x_part)
    return prompts, conts


def problem_nll(model: Any, tokenizer: Any, items: Sequence[SeedItem]) -> float:
    """Mean per-token NLL of x given (c, z) under p_θ: the EM convergence signal."""
    total, count = continuation_nll(model, tokenizer, *_problem_given_rationale(tokenizer, items))
    return total / count if count else float("nan")


def problem_nlls(model: Any, tokenizer: Any, items: Sequence[SeedItem]) -> list[tuple[float, int]]:
    """Per item, (summed NLL, tokens) of x given (c, z): ``problem_nll`` item by item, for an
    interval over seeds (bench/experiment.py)."""
    prompts, conts = _problem_given_rationale(tokenizer, items)
    return [
        continuation_nll(model, tokenizer, [p], [c], batch_size=1) for p, c in zip(prompts, conts)
    ]


def greedy_rationales(
    model: Any,
    tokenizer: Any,
    items: Sequence[SeedItem],
    max_new_tokens: int,
    batch_size: int = 8,
) -> list[str | None]:
    """z decoded greedily from q_φ for each (c, x); None where the output does not parse (no
    text, or cut by the token budget before its closing delimiter)."""
    decoded = greedy_decode(
        model,
        tokenizer,
        [rationale_prompt(tokenizer, it) for it in items],
        max_new_tokens,
        RATIONALE_MODEL.stop,
        batch_size,
    )
    out: list[str | None] = []
    for text, finished in decoded:
        try:
            out.append(parse_rationale(text, truncated=not finished))
        except ParseError:
            out.append(None)
    return out


def mean_reward(p: RoleModel, items: Sequence[SeedItem]) -> float:
    """Mean R(z) = log p_θ(x | z, c) + log p_θ(z | c) of the items' rationales under p_θ."""
    z_prompts, z_parts, x_prompts, x_parts = [], [], [], []
    for item in items:
        prompt = synthesis_prompt(p.tokenizer, item)
        z_part, x_part = synthesis_parts(item.rationale, item.problem)
        z_prompts.append(prompt)
        z_parts.append(z_part)
        x_prompts.append(prompt + z_part)
        x_parts.append(x_part)
    nll_z, _ = continuation_nll(p.model, p.tokenizer, z_prompts, z_parts)
    nll_x, _ = continuation_nll(p.model, p.tokenizer, x_prompts, x_parts)
    return -(nll_z + nll_x) / len(items) if items else float("nan")


def rationale_tokens(tokenizer: Any, rationales: Sequence[str]) -> float:
    """Mean length in tokens of the rationales as q_φ writes them (closing delimiter included):
    reported beside the reward, so that a reward rising with shorter rationales shows."""
    if not rationales:
        return float("nan")
    texts = [rationale_completion(z) for z in rationales]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return sum(len(i) for i in ids) / len(ids)


def greedy_rationales_as_written(
    q: RoleModel, items: Sequence[SeedItem], max_new_tokens: int, batch: int
) -> list[tuple[str, bool]]:
    """(z, parsed) per item: q_φ's greedy rationale, parsed; an output that does not parse is
    kept as written (it is still what q_φ would give the M-step to learn from)."""
    decoded = greedy_decode(
        q.model,
        q.tokenizer,
        [rationale_prompt(q.tokenizer, it) for it in items],
        max_new_tokens,
        RATIONALE_MODEL.stop,
        batch,
    )
    out = []
    for text, finished in decoded:
        try:
            out.append((parse_rationale(text, truncated=not finished), True))
        except ParseError:
            out.append((text.strip() or "-", False))
    return out


def greedy_reward(
    q: RoleModel, p: RoleModel, items: Sequence[SeedItem], max_new_tokens: int, batch: int
) -> tuple[float, float]:
    """(mean reward under p_θ, mean length in tokens) of q_φ's greedy rationale per item, each
    scored as ``greedy_rationales_as_written`` gives it."""
    decoded = greedy_rationales_as_written(q, items, max_new_tokens, batch)
    scored = [item.with_rationale(z) for item, (z, _) in zip(items, decoded)]
    return mean_reward(p, scored), rationale_tokens(q.tokenizer, [i.rationale for i in scored])


# ---------------------------------------------------------------------------------------------
# The trainer


class EMTrainer:
    """Holds p_θ and q_φ in memory between windows (loading SmolLM2 costs seconds; a window
    may be small), resuming from the newest checkpoints of both roles, optimiser state
    included. Each role trains and saves under its lineage's lock (trainer/lineage.py)."""

    ROLES = (Role.RATIONALE_MODEL, Role.PROMPT_MODEL)

    def __init__(self, settings: TrainerSettings, base_paths: dict[str, str]):
        self.settings = settings
        self.base_paths = base_paths
        self.store = CheckpointStore(settings.checkpoint_dir, settings.keep_last)
        self.lineages = {role: role_lineage(self.store, role) for role in self.ROLES}
        self.ledger = TrainedLedger.load(self.store, list(self.ROLES))
        self.heldout = HeldoutPool(
            settings.checkpoint_dir / "heldout-seeds.jsonl", settings.heldout_seeds
        )
        self._lock = threading.RLock()  # the cold start (stage start) and windows take turns
        if settings.torch_threads:
            torch_module().set_num_threads(settings.torch_threads)

    @classmethod
    def on_models(cls, settings: TrainerSettings, models: ModelRoles) -> EMTrainer:
        """The trainer of the configured p_θ and q_φ (the embedded SmolLM2 where none is
        named)."""
        return cls(settings, {role: model_path_for(models, role) for role in cls.ROLES})

    def model(self, role: str, cfg: StepConfig) -> RoleModel:
        """The role's model, on its newest checkpoint (loaded with ``cfg``'s LoRA setting)."""
        return self.lineages[role].model(
            lambda: load_role_model(
                self.store,
                role,
                self.base_paths[role],
                use_lora=cfg.use_lora,
                lora=cfg.lora,
                dtype=self.settings.dtype,
                device=self.settings.device,
            )
        )

    def _train(
        self,
        rm: RoleModel,
        examples: list[dict[str, str]],
        cfg: StepConfig,
        on_step: StepReport | None = None,
    ) -> WindowLosses:
        return sft(rm, examples, cfg, EngineOptions.of(self.settings), on_step)

    def _save(
        self,
        rm: RoleModel,
        step: str,
        metrics: dict[str, float],
        trained_ids: list[str],
        parents: list[str],
    ) -> ModelUpdate:
        ckpt = save_role_model(
            self.store,
            rm,
            step,
            metrics,
            trained_ids,
            parents,
            save_optimizer=self.settings.save_optimizer,
        )
        self.ledger.add(rm.role, {**ckpt.metadata, "path": str(ckpt.path)})
        return model_update(rm, step, metrics, parents)

    def _announced(self, role: str, record_ids: list[str]) -> list[ModelUpdate]:
        """The updates checkpoints of ``role`` trained on these records were announced with
        (a redelivered window announces them again; their ids are unchanged)."""
        found = (update_from_manifest(m) for m in self.ledger.manifests_for(role, record_ids))
        return [u for u in found if u is not None]

    def announced(self, record_ids: list[str]) -> list[ModelUpdate]:
        """Every role's updates that trained on any of these records."""
        return [u for role in self.ROLES for u in self._announced(role, record_ids)]

    def _signal_items(self, fallback: Sequence[SeedItem]) -> tuple[list[SeedItem], str]:
        pool = [SeedItem(**row) for row in self.heldout.items()]
        return (pool, "heldout") if pool else (list(fallback), "train")

    def _remember_heldout(self, items: Iterable[SeedItem]) -> None:
        self.heldout.add((i.seed_id, asdict(i)) for i in items)

    # -- cold start ---------------------------------------------------------------------------

    def needs_cold_start(self) -> bool:
        """No checkpoint yet for p_θ or q_φ: the models are still the base weights."""
        return any(self.store.latest(role) is None for role in self.ROLES)

    def cold_start(
        self,
        seeds: Sequence[AnnotatedSeed],
        *,
        force: bool = False,
        report: Report | None = None,
    ) -> list[ModelUpdate]:
        """SFT of both models on the annotated (c, z, x) triples (held-out seeds excluded; they
        start the held-out pool). Resumable: a role that has a checkpoint already is not trained
        again, its newest version is announced instead (``force``: train it again anyway, from
        its newest version). ``report`` hears of each phase and training step."""
        with self._lock:
            try:
                return self._cold_start(seeds, force, report or (lambda what, done, of: None))
            except BaseException:
                self._discard_models()
                raise
            finally:
                memory.release()  # what the training freed goes back to the system

    def _cold_start(
        self, seeds: Sequence[AnnotatedSeed], force: bool, report: Report
    ) -> list[ModelUpdate]:
        s = self.settings
        items = [SeedItem.from_annotated(seed) for seed in seeds]
        train = [i for i in items if not is_heldout(i.seed_id, s.heldout_fraction)]
        self._remember_heldout(i for i in items if is_heldout(i.seed_id, s.heldout_fraction))
        if not train:
            return []
        parents = [i.source_id for i in train][:64]
        updates = []
        for role in self.ROLES:
            latest = self.store.latest(role)
            if latest is not None and not force:
                again = update_from_manifest({**latest.metadata, "path": str(latest.path)})
                updates += [again] if again is not None else []
                continue
            with self.lineages[role].training():
                updates.append(self._cold_start_role(role, train, parents, report))
        return updates

    def _cold_start_role(
        self, role: str, train: list[SeedItem], parents: list[str], report: Report
    ) -> ModelUpdate:
        cfg = self.settings.cold_start
        report(f"loading {role}", 0, 0)
        rm = self.model(role, cfg)
        metrics: dict[str, float] = {"n_seeds": len(train)}

        def step(done: int, of: int) -> None:
            report(f"training {role}", done, of)

        if role == Role.RATIONALE_MODEL:
            examples = [rationale_model_example(rm.tokenizer, i) for i in train]
            metrics.update(self._train(rm, examples, cfg, step).metrics())
        else:
            signal, label = self._signal_items(train)
            scoring = f"scoring {role} on {len(signal)} {label} seeds"
            report(scoring, 0, 0)
            before = problem_nll(rm.model, rm.tokenizer, signal)
            examples = [prompt_model_example(rm.tokenizer, i) for i in train]
            metrics.update(self._train(rm, examples, cfg, step).metrics())
            report(scoring, 0, 0)
            metrics[f"{label}_problem_nll_before"] = before
            metrics[f"{label}_problem_nll_after"] = problem_nll(rm.model, rm.tokenizer, signal)
        return self._save(rm, "cold_start", metrics, [], parents)

    # -- one EM window ------------------------------------------------------------------------

    def run_window(self, rationales: Sequence[Rationale]) -> WindowResult:
        """E-step then M-step on one window of scored rationales; a window under
        ``e_step.window.min_records`` trains nothing (module docstring, "Windows")."""
        with self._lock:
            try:
                return self._run_window(list(rationales))
            except BaseException:
                self._discard_models()
                raise
            finally:
                memory.release()  # what the window freed goes back to the system

    def _discard_models(self) -> None:
        """After a failed window the models in memory may hold updates no checkpoint has: drop
        them, so the retry starts again from the newest checkpoints (what the ledger says)."""
        for lineage in self.lineages.values():
            lineage.discard()

    def _run_window(self, rationales: list[Rationale]) -> WindowResult:
        s = self.settings
        window_ids = [r.id for r in rationales]
        window = Window.of(rationales, s.heldout_fraction)
        next_epoch = self.next_epoch_seeds(window)
        if len(rationales) < s.e_step.window.min_records:
            # Records trained on before (a redelivery): their versions are announced again.
            reason = (
                f"window of {len(rationales)} rationales < min_records "
                f"{s.e_step.window.min_records}: not trained on"
            )
            return WindowResult(self.announced(window_ids), reason, next_epoch=next_epoch)
        self._remember_heldout(window.heldout)
        if len(window.train) < s.e_step.min_seeds:
            reason = f"{len(window.train)} trainable seeds < min_seeds {s.e_step.min_seeds}"
            return WindowResult([], reason, next_epoch=next_epoch)
        q_role, p_role = Role.RATIONALE_MODEL, Role.PROMPT_MODEL
        e_todo = [r for r in rationales if self.ledger.get(q_role, r.id) is None]
        m_todo = [r for r in rationales if self.ledger.get(p_role, r.id) is None]
        updates: list[ModelUpdate] = []
        metrics: dict[str, float] = {}

        # Per step: the versions that trained on part of this window before it came again are
        # announced again, then the rest of the window is trained.
        for role, todo, step, enabled in (
            (q_role, e_todo, self._e_step, s.e_step.enabled),
            (p_role, m_todo, self._m_step, s.m_step.enabled),
        ):
            pending = {r.id for r in todo}
            updates += self._announced(role, [i for i in window_ids if i not in pending])
            update = step(window.part(todo, s.heldout_fraction)) if enabled and todo else None
            if update is not None:
                updates.append(update)
                metrics.update(update.metrics)
        skipped = None
        if not (e_todo or m_todo):
            skipped = f"all {len(rationales)} rationales already trained on; versions re-announced"
        return WindowResult(updates, skipped, metrics or None, next_epoch)

    def _e_step(self, window: Window) -> ModelUpdate | None:
        """q_φ learns to write the rationale that best explains each problem."""
        if not window.train:
            return None
        with self.lineages[Role.RATIONALE_MODEL].training():
            return self._e_step_trained(window)

    def _e_step_trained(self, window: Window) -> ModelUpdate:
        s = self.settings
        rationales, best, train = window.rationales, window.best, window.train
        q = self.model(Role.RATIONALE_MODEL, s.e_step)
        p = self.model(Role.PROMPT_MODEL, s.m_step)
        signal, label = self._signal_items(train)
        budget, batch = s.m_step.max_rationale_tokens, s.m_step.generation_batch_size
        before, tokens_before = greedy_reward(q, p, signal, budget, batch)
        losses = self._train(q, [rationale_model_example(q.tokenizer, i) for i in train], s.e_step)
        after, tokens_after = greedy_reward(q, p, signal, budget, batch)
        rewards = [best[i.seed_id].reward for i in train]
        metrics = {
            **losses.metrics(),
            "n_seeds": len(train),
            "n_rationales": len(rationales),
            "mean_best_reward": sum(rewards) / len(rewards),
            f"{label}_reward_before": before,
            f"{label}_reward_after": after,
            # Lengths beside the rewards: best-of-K picking the shorter samples, or q_φ's
            # rationales shrinking while the reward rises, is "shorter", not "better".
            "mean_best_rationale_tokens": rationale_tokens(
                q.tokenizer, [i.rationale for i in train]
            ),
            "mean_sampled_rationale_tokens": rationale_tokens(
                q.tokenizer, [r.text for r in rationales]
            ),
            f"{label}_rationale_tokens_before": tokens_before,
            f"{label}_rationale_tokens_after": tokens_after,
        }
        parents = [best[i.seed_id].id for i in train]
        log.info(
            "E-step: %d seeds, %s reward %.3f -> %.3f, rationale %.1f -> %.1f tokens",
            len(train),
            label,
            before,
            after,
            tokens_before,
            tokens_after,
        )
        return self._save(q, "e_step", metrics, [r.id for r in rationales], parents)

    def _m_step(self, window: Window) -> ModelUpdate | None:
        """p_θ learns c -> (z, x) with z from the updated q_φ (greedy). A seed whose decode does
        not parse keeps its best-of-K z: the sampled z is still a valid rationale."""
        if not window.train:
            return None
        with self.lineages[Role.PROMPT_MODEL].training():
            return self._m_step_trained(window)

    def _m_step_trained(self, window: Window) -> ModelUpdate:
        s = self.settings
        rationales, best, train = window.rationales, window.best, window.train
        q = self.model(Role.RATIONALE_MODEL, s.e_step)
        p = self.model(Role.PROMPT_MODEL, s.m_step)
        decoded = greedy_rationales(
            q.model,
            q.tokenizer,
            train,
            s.m_step.max_rationale_tokens,
            s.m_step.generation_batch_size,
        )
        m_items = [i.with_rationale(z) if z else i for i, z in zip(train, decoded)]
        signal, label = self._signal_items(train)
        before = problem_nll(p.model, p.tokenizer, signal)
        # The same on the window's own (c, z, x): falling while the held-out NLL rises is
        # p_θ fitting the seeds it revisits epoch after epoch, not learning the task.
        fit_before = problem_nll(p.model, p.tokenizer, m_items)
        losses = self._train(p, [prompt_model_example(p.tokenizer, i) for i in m_items], s.m_step)
        after = problem_nll(p.model, p.tokenizer, signal)
        metrics = {
            **losses.metrics(),
            "n_seeds": len(train),
            "n_heldout": len(signal) if label == "heldout" else 0,
            "greedy_fallbacks": sum(z is None for z in decoded),
            "mean_decoded_rationale_tokens": rationale_tokens(
                p.tokenizer, [i.rationale for i in m_items]
            ),
            f"{label}_problem_nll_before": before,
            f"{label}_problem_nll_after": after,
            "window_problem_nll_before": fit_before,
            "window_problem_nll_after": problem_nll(p.model, p.tokenizer, m_items),
        }
        parents = [best[i.seed_id].id for i in train]
        log.info("M-step: %d seeds, %s NLL %.4f -> %.4f", len(train), label, before, after)
        return self._save(p, "m_step", metrics, [r.id for r in rationales], parents)

    # -- epochs -------------------------------------------------------------------------------

    def next_epoch_seeds(self, window: Window) -> list[AnnotatedSeed]:
        """Each seed of the window once more, one epoch on (``max_epochs`` caps the loop). The
        best rationale so far travels as the seed's annotation; the id names (seed, epoch), so
        a redelivered window sends the same seeds again, not new ones."""
        chosen: dict[str, Rationale] = {}
        for r in window.rationales:  # the first of each seed, replaced by the best-of-K one
            chosen.setdefault(r.seed_id, r)
        chosen.update(window.best)
        cap = self.settings.max_epochs
        out = []
        for seed_id in sorted(chosen):
            r = chosen[seed_id]
            if cap is not None and r.epoch + 1 >= cap:
                continue
            out.append(
                AnnotatedSeed.derived_from(
                    r,
                    seed_id=r.seed_id,
                    annotator=NEXT_EPOCH_ANNOTATOR,
                    **AnnotatedSeed.carrying(r.payload()),
                    rationale=r.text,
                    epoch=r.epoch + 1,
                )
            )
        return out

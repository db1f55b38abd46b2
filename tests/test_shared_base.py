"""One copy of the base weights per process (llm/shared_base.py): the roles a process serves, the
trainer's trainable copies and an eval all sit on one frozen copy of the base, each with its own
adapter; a role moving to a new version changes only that role; the memory account counts the
base once. Real models: the trained tiny model for serving, the trainer tests' tiny model for
training."""

from __future__ import annotations

import gc
import threading
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)  # the machine is shared; these models are tiny

from trainer_data import build_tiny_model, fast, problem, rationale, trainer_settings

from llm import prompts as P
from llm.backends import BackendPool, BackendSettings
from trainer.checkpoints import CheckpointStore

ROLES = ("prompt_model", "rationale_model", "solver")


def adapter_folder(base: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter on ``base`` whose B matrices are not zero (random init), so that it
    changes what the model says: a stand-in for a trained version."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=64, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(base), local_files_only=True).save_pretrained(str(out))
    return out


def weights(model) -> dict[str, int]:
    """name -> data pointer of every base parameter and buffer (adapter weights left out), by
    the name it has in the base model (peft prefixes and wraps them)."""
    out = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if "lora_" in name:
            continue
        plain = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        out[plain] = tensor.untyped_storage().data_ptr()
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [adapter_folder(tiny_model_dir, root / f"v000{i}-m_step", seed=i) for i in (1, 2, 3)]


@pytest.fixture
def pool(tiny_model_dir):
    settings = BackendSettings(model=str(tiny_model_dir), max_model_len=512)
    return BackendPool(dict.fromkeys(ROLES, settings))


def probe(backend) -> tuple[str, list[float]]:
    """What a role says: a greedy completion and the log-probs of a fixed continuation."""
    prompt = P.SOLVER_MATH.render(backend, problem=problem(0))
    text = backend.generate([prompt], temperature=0.0, max_tokens=12)[0][0].text
    return text, backend.score([prompt], [" The answer is 5."])[0].token_logprobs


def test_roles_on_one_base_share_its_weights(pool, adapters):
    """Three roles on three versions: three model objects, three adapters, one storage per base
    tensor (parameters and buffers alike)."""
    for role, adapter in zip(ROLES, adapters):
        pool.reload(role, str(adapter))
    models = [pool.get(role).model for role in ROLES]
    assert len({id(m) for m in models}) == 3
    first = weights(models[0])
    assert len(first) > 10
    for model in models[1:]:
        assert weights(model) == first  # same names, same storages
    lora = [{n: p.data_ptr() for n, p in m.named_parameters() if "lora_" in n} for m in models]
    assert all(lora) and not set(lora[0].values()) & set(lora[1].values())
    # No shared module state: a role's train/eval flag is its own.
    models[0].train()
    assert not models[1].training and not models[2].training
    models[0].eval()


def test_a_role_moving_to_a_new_version_leaves_the_others_unchanged(pool, adapters):
    for role, adapter in zip(ROLES, adapters):
        pool.reload(role, str(adapter))
    before = {role: probe(pool.get(role)) for role in ROLES}
    assert before["prompt_model"] != before["solver"]  # the adapters do change what is said
    pool.reload("prompt_model", str(adapters[2]))  # p_θ moves to the solver's version
    after = {role: probe(pool.get(role)) for role in ROLES}
    assert after["rationale_model"] == before["rationale_model"]
    assert after["solver"] == before["solver"]
    assert after["prompt_model"] == before["solver"]  # same base, same adapter, same outputs
    assert weights(pool.get("prompt_model").model) == weights(pool.get("solver").model)


def test_roles_generate_from_several_threads_while_another_reloads(pool, adapters):
    """Stages call their backends from several threads while the follower reloads a role:
    each role's greedy outputs stay what they are alone."""
    pool.reload("solver", str(adapters[0]))
    pool.reload("rationale_model", str(adapters[1]))
    want = {role: probe(pool.get(role)) for role in ("solver", "rationale_model")}
    got: dict[str, list] = {role: [] for role in want}
    failures: list[BaseException] = []

    def call(role: str) -> None:
        try:
            for _ in range(3):
                got[role].append(probe(pool.get(role)))
        except BaseException as e:  # noqa: BLE001  (reported below)
            failures.append(e)

    threads = [threading.Thread(target=call, args=(role,)) for role in want]
    for t in threads:
        t.start()
    for i in range(4):  # p_θ moves back and forth meanwhile
        pool.reload("prompt_model", str(adapters[i % 2]))
    for t in threads:
        t.join()
    assert not failures
    assert got == {role: [want[role]] * 3 for role in want}


def test_the_trainers_copies_share_the_base_and_training_leaves_it_unchanged(
    tmp_path, tmp_path_factory
):
    """p_θ, q_φ and the solver the trainer trains, and the roles served beside them: one copy
    of the base. A training window changes its own adapter only."""
    from trainer.dpo import DPOTrainerLoop
    from trainer.em import EMTrainer, SeedItem, prompt_model_example, sft

    base = build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    lora = fast(lr=1e-2, epochs=2, use_lora=True, lora={"r": 4})
    settings = trainer_settings(tmp_path, base, m_step=lora, e_step=lora, dpo=lora).trainer
    em = EMTrainer(settings, {"prompt_model": str(base), "rationale_model": str(base)})
    p = em.model("prompt_model", settings.m_step)
    q = em.model("rationale_model", settings.e_step)
    solver = DPOTrainerLoop(settings, str(base)).solver
    served = BackendPool({"solver": BackendSettings(model=str(base))}).get("solver")
    first = weights(p.model)
    for other in (q.model, solver.model, served.model):
        assert weights(other) == first
    base_bytes = {n: t.clone() for n, t in p.model.named_parameters() if "lora_" not in n}
    prompt = P.SOLVER_MATH.render(served, problem=problem(1))
    ids = q.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        q_before = q.model(input_ids=ids).logits
    served_before = served.score([prompt], [rationale(1, 0)])[0].token_logprobs
    lora_before = {n: t.clone() for n, t in p.model.named_parameters() if "lora_" in n}

    item = SeedItem("s", "math", ["counting"], "", problem(1), rationale(1, 0))
    sft(p, [prompt_model_example(p.tokenizer, item)] * 4, settings.m_step)

    for name, tensor in p.model.named_parameters():
        if "lora_" in name:
            continue
        assert torch.equal(tensor, base_bytes[name]), f"{name} of the shared base changed"
    moved = [n for n, t in p.model.named_parameters() if n in lora_before]
    assert any(not torch.equal(dict(p.model.named_parameters())[n], lora_before[n]) for n in moved)
    with torch.no_grad():
        assert torch.equal(q.model(input_ids=ids).logits, q_before)
    assert served.score([prompt], [rationale(1, 0)])[0].token_logprobs == served_before
    assert weights(p.model) == first


def test_an_eval_reuses_the_served_base(pool, adapters, tiny_model_dir, monkeypatch):
    """Scoring a new solver version loads its adapter, not a second base."""
    from llm import shared_base
    from trainer.evaluate import evaluate_path
    from trainer.settings import EvalConfig

    pool.reload("solver", str(adapters[0]))  # the served roles hold the base
    loads = []
    real = shared_base.SharedBase.__init__

    def counted(self, key):
        loads.append(key)
        real(self, key)

    monkeypatch.setattr(shared_base.SharedBase, "__init__", counted)
    cfg = EvalConfig(limit=1, max_tokens=8, batch_size=1)
    assert evaluate_path(str(adapters[1]), cfg, role="solver").n == 1
    assert loads == []


def test_merging_into_a_shared_base_is_refused_and_full_fine_tuning_gets_its_own_copy(
    tmp_path, tiny_model_dir
):
    from llm.shared_base import SharedWeightsError, base_of, role_model
    from trainer.role_models import apply_lora_setting, load_role_model, save_role_model
    from trainer.settings import LoraConfig

    on_base = apply_lora_setting(role_model(tiny_model_dir), True, LoraConfig(r=4))
    with pytest.raises(SharedWeightsError):
        apply_lora_setting(on_base, False, None)  # a merge would change every role on it
    store = CheckpointStore(tmp_path)
    lora = load_role_model(store, "p", str(tiny_model_dir), use_lora=True, lora=LoraConfig(r=4))
    assert base_of(lora.model) is base_of(on_base)
    save_role_model(store, lora, "dpo")
    full = load_role_model(store, "p", str(tiny_model_dir), use_lora=False)
    assert base_of(full.model) is None
    shared = base_of(on_base).storage_ptrs()
    assert not {p.untyped_storage().data_ptr() for p in full.model.parameters()} & shared


def test_a_base_nobody_uses_is_freed(tmp_path_factory):
    from llm.shared_base import base_key, live_bases, role_model

    base = build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    models = [role_model(base), role_model(base)]
    key = base_key(base)
    assert [b.key for b in live_bases()].count(key) == 1
    del models
    gc.collect()
    assert key not in [b.key for b in live_bases()]


def test_the_memory_account_counts_the_shared_base_once(tiny_model_dir, adapters):
    """Each base tensor is counted once, under the base; a role counts its adapter as its own
    and the base as shared; the gauges report the same."""
    from prometheus_client import REGISTRY

    from llm.shared_base import base_of
    from streams import memory

    roles = ("account_a", "account_b", "account_c")  # labels no other test's pool uses
    pool = BackendPool({r: BackendSettings(model=str(tiny_model_dir)) for r in roles})
    for role, adapter in zip(roles, adapters):
        pool.reload(role, str(adapter))
    rows = {r.component: r for r in memory.tensor_account()}
    base = base_of(pool.get("account_a").model)
    base_row = rows[f"shared base {base.key}"]
    assert base_row.own == base.nbytes and base_row.shared == 0
    for role in roles:
        row = rows[f"serving {role}"]
        adapter_bytes = sum(
            p.untyped_storage().nbytes()
            for n, p in pool.get(role).model.named_parameters()
            if "lora_" in n
        )
        assert row.own == adapter_bytes and row.shared == base.nbytes
    scraped = REGISTRY.get_sample_value(
        "promptcot_model_weight_bytes", {"component": "serving account_a", "sharing": "shared"}
    )
    assert scraped == base.nbytes
    resident = sum(
        REGISTRY.get_sample_value("promptcot_process_resident_bytes", {"kind": kind})
        for kind in ("anon", "file", "shmem")
    )
    assert resident == pytest.approx(memory.resident_bytes(), rel=0.05)

"""A tiny Llama built from scratch and trained for a minute on the project's own prompt formats.

It stands in for every model role in tests: it answers the synthesis template with delimited
rationale + arithmetic word problem, the math solver with a small boxed integer (it has not
learned arithmetic, so answers vary and majority voting is non-trivial), the code solver with one
fenced python block, and the test writer with a JSON block.

Built once per content of this file + llm/prompts.py and cached under
``~/.cache/promptcot/tiny-model-<hash>`` (override the root with PROMPTCOT_CACHE_DIR).

    python tests/tiny_model.py        # build (or find) it and print its folder
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from llm import prompts as P

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
VOCAB_SIZE = 2048
TRAIN_STEPS = 120
BATCH = 8
MAX_LEN = 320
SEED = 1234

# ---------------------------------------------------------------------------------------------
# Synthetic corpus (deterministic), rendered with the project's own templates

NAMES = ["Ana", "Ben", "Carla", "Dev", "Eva", "Femi", "Gus", "Hana", "Ivan", "Jia", "Kofi", "Lea"]
ITEMS = ["apples", "pencils", "marbles", "stickers", "books", "coins", "cards", "shells"]
LADDER = ["AMC12", "HMMT-Nov", "HMMT-Feb", "AIME", "USAJMO", "USAMO"]
GENERIC = ["reading a word problem", "whole numbers", "counting objects", "units of quantity"]

# op -> (concepts, rationale idea, problem text, answer)
MATH_OPS = {
    "add": (
        ["addition of whole numbers", "combining two groups"],
        "start from one group of {item}, add a second group, and ask for the total",
        "{name} has {a} {item}. {name} gets {b} more {item}. How many {item} does {name} have now?",
        lambda a, b: a + b,
    ),
    "sub": (
        ["subtraction of whole numbers", "taking away from a group"],
        "start from a group of {item}, remove some, and ask how many remain",
        "{name} had {a} {item} and gave {b} of them away. How many {item} are left?",
        lambda a, b: a - b,
    ),
    "mul": (
        ["multiplication as repeated addition", "equal groups"],
        "make several equal groups of {item} and ask for the total count",
        "{name} has {a} boxes with {b} {item} in each box. How many {item} are there in total?",
        lambda a, b: a * b,
    ),
    "div": (
        ["division as equal sharing", "multiplication facts"],
        "share a number of {item} equally and ask for the size of one share",
        "{name} shares {a} {item} equally among {b} friends. How many {item} does each friend get?",
        lambda a, b: a // b,
    ),
}

CODE_OPS = {
    "sum": (["reading integers from input", "addition"], "a + b", lambda a, b: a + b),
    "product": (["reading integers from input", "multiplication"], "a * b", lambda a, b: a * b),
    "max": (["reading integers from input", "comparison"], "max(a, b)", lambda a, b: max(a, b)),
    "difference": (
        ["reading integers from input", "absolute value"],
        "abs(a - b)",
        lambda a, b: abs(a - b),
    ),
}


def _math_problem(rng: random.Random) -> tuple[list[str], str, str, int]:
    op = rng.choice(list(MATH_OPS))
    concepts, idea, text, fn = MATH_OPS[op]
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    if op == "sub":
        b = rng.randint(1, 9)
        a = b + rng.randint(1, 9)
    elif op == "div":
        b = rng.randint(2, 6)
        a = b * rng.randint(1, 6)
    elif op == "mul":
        a, b = rng.randint(2, 6), rng.randint(2, 6)
    else:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
    k = rng.randint(3, 5)
    full_concepts = (concepts + rng.sample(GENERIC, len(GENERIC)))[:k]
    rationale = (
        f"Combine {full_concepts[0]} with {full_concepts[1]}: {idea.format(item=item)}. "
        f"Use small numbers such as {a} and {b} so the answer is a whole number."
    )
    problem = text.format(name=name, item=item, a=a, b=b)
    return full_concepts, rationale, problem, fn(a, b)


def _code_problem(rng: random.Random) -> tuple[list[str], str, str, str, tuple[int, int, int]]:
    op = rng.choice(list(CODE_OPS))
    concepts, expr, fn = CODE_OPS[op]
    k = rng.randint(3, 4)
    full_concepts = (concepts + ["standard input and output", "integer arithmetic"])[:k]
    rationale = (
        f"Combine {full_concepts[0]} with {full_concepts[1]}: read two integers and print "
        f"their {op}, a short exercise in input parsing."
    )
    problem = (
        f"The input has one line with two integers a and b (1 <= a, b <= 100). "
        f"Print the {op} of a and b."
    )
    a, b = rng.randint(1, 30), rng.randint(1, 30)
    code = f"import sys\na, b = map(int, sys.stdin.read().split())\nprint({expr})"
    return full_concepts, rationale, problem, code, (a, b, fn(a, b))


def _pair(template: P.Template, completion: str, **fields: object) -> tuple[str, str]:
    # render_chat(None, ...) is ChatML, the same text the saved chat template produces.
    prompt = template.render(None, **fields)
    return prompt, completion + "<|im_end|>"


def make_corpus(n: int, seed: int = SEED) -> list[tuple[str, str]]:
    """(prompt, completion) pairs covering every template."""
    rng = random.Random(seed)
    out: list[tuple[str, str]] = []
    for _ in range(n):
        task = rng.choices(
            [
                "synth_math",
                "synth_code",
                "solve_math",
                "solve_code",
                "test",
                "concepts",
                "rationale",
                "annotation",
            ],
            weights=[20, 8, 18, 16, 16, 8, 9, 5],  # code formats need more exposure
        )[0]
        if task in ("synth_math", "solve_math", "concepts", "rationale", "annotation"):
            concepts, rationale, problem, answer = _math_problem(rng)
            domain, difficulty = "math", rng.choice(LADDER)
        else:
            concepts, rationale, problem, code, (a, b, result) = _code_problem(rng)
            domain, difficulty = "code", "codeforces"
        if task.startswith("synth"):
            z, x = P.synthesis_parts(rationale, problem)
            out.append(
                _pair(P.SYNTHESIS, z + x, **P.synthesis_fields(concepts, difficulty, domain))
            )
        elif task == "solve_math":
            work = (
                "We work with the numbers in the problem step by step.\n"
                f"The answer is \\boxed{{{answer}}}."
            )
            out.append(_pair(P.SOLVER_MATH, work, problem=problem))
        elif task == "solve_code":
            out.append(_pair(P.SOLVER_CODE, f"```python\n{code}\n```", problem=problem))
        elif task == "test":
            out.append(
                _pair(
                    P.TEST_WRITER, P.test_completion(f"{a} {b}\n", f"{result}\n"), problem=problem
                )
            )
        elif task == "concepts":
            out.append(
                _pair(
                    P.CONCEPT_ANNOTATION,
                    P.concepts_completion(concepts),
                    k=len(concepts),
                    problem=problem,
                )
            )
        else:
            template = P.RATIONALE_MODEL if task == "rationale" else P.RATIONALE_ANNOTATION
            out.append(
                _pair(
                    template,
                    P.rationale_completion(rationale),
                    concepts=P.format_concepts(concepts),
                    problem=problem,
                )
            )
    return out


# ---------------------------------------------------------------------------------------------
# Build


def _train_tokenizer(texts: list[str], out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    # TokenizersBackend keeps the trained ids (a model_type-specific class may remap them).
    config = {
        "tokenizer_class": "TokenizersBackend",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|pad|>",
        "unk_token": None,
        "model_max_length": 1024,
        "chat_template": P.CHATML_TEMPLATE,
        "add_bos_token": False,
        "add_eos_token": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|pad|>"})
    )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)


def build_tiny_model(out_dir: Path, steps: int = TRAIN_STEPS, log: bool = True) -> Path:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    started = time.time()
    torch.manual_seed(SEED)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = make_corpus(4000)
    tokenizer = _train_tokenizer([p + c for p, c in corpus], out_dir)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    pad = tokenizer.convert_tokens_to_ids("<|pad|>")

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=eot,
        eos_token_id=im_end,
        pad_token_id=pad,
    )
    model = LlamaForCausalLM(config)

    # Loss on the assistant turn only: the capacity goes to the output formats.
    examples = []
    for prompt, completion in corpus:
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        ids = (p_ids + c_ids)[:MAX_LEN]
        labels = ([-100] * len(p_ids) + c_ids)[:MAX_LEN]
        examples.append((ids, labels))

    rng = random.Random(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    warmup = 15
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / steps),
    )
    model.train()
    for step in range(steps):
        batch = rng.sample(examples, BATCH)
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((BATCH, width), pad)
        labels = torch.full((BATCH, width), -100)
        mask = torch.zeros((BATCH, width), dtype=torch.long)
        for row, (ids, lab) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(lab)] = torch.tensor(lab)
            mask[row, : len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if log and (step % 20 == 0 or step == steps - 1):
            print(
                f"tiny model step {step} loss {loss.item():.3f} ({time.time() - started:.0f}s)",
                flush=True,
            )
    model.eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[im_end, eot], pad_token_id=pad, bos_token_id=eot
    )
    model.save_pretrained(str(out_dir))
    return out_dir


def cache_key() -> str:
    """This file plus the ids of the templates it trains on: an edit elsewhere in prompts.py
    (a parser, a helper) does not force a rebuild, a changed template does."""
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update("|".join(sorted(t.id for t in P.TEMPLATES.values())).encode())
    return h.hexdigest()[:12]


def cache_root() -> Path:
    return Path(os.environ.get("PROMPTCOT_CACHE_DIR", Path.home() / ".cache" / "promptcot"))


def tiny_model_dir() -> Path:
    """The cached tiny model, built on first use. Safe against concurrent builders: each builds
    in a private folder and the first to finish renames it into place."""
    target = cache_root() / f"tiny-model-{cache_key()}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build_tiny_model(staging)
        try:
            os.rename(staging, target)
        except OSError:  # another builder won the race; use theirs
            pass
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


if __name__ == "__main__":
    print(tiny_model_dir())

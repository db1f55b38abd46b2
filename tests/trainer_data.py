"""What the trainer tests share: a tiny from-scratch Llama (hidden 64, 2 layers, ~0.1M params,
random weights: these tests need a model that learns, and building it takes about a second),
templated seeds, rationales and preference pairs, and trainer settings for it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llm import prompts as P
from promptcot.settings import Settings
from streams.records import PreferencePair, Rationale

# ---------------------------------------------------------------------------------------------
# A tiny model


def build_tiny_model(out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    texts = [
        P.render_chat(None, t.system, t.user, t.assistant_prefix) for t in P.TEMPLATES.values()
    ]
    texts += [problem(i) + " " + rationale(i, 0) for i in range(12)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    out.mkdir(parents=True)
    tok.save(str(out / "tokenizer.json"))
    # TokenizersBackend keeps the trained ids (docs/models.md, "The tiny test model").
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "TokenizersBackend",
                "eos_token": "<|im_end|>",
                "pad_token": "<|pad|>",
                "chat_template": P.CHATML_TEMPLATE,
                "model_max_length": 2048,
            }
        )
    )
    tokenizer = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(str(out))
    return out


NAMES = ["Ana", "Ben", "Carla", "Dev", "Eva", "Femi", "Gus", "Hana", "Ivan", "Jia", "Kofi", "Lea"]


def problem(i: int) -> str:
    return f"{NAMES[i % len(NAMES)]} has {i + 2} apples and gets {i + 3} more. How many apples now?"


def rationale(i: int, k: int) -> str:
    return (
        f"Combine addition with counting: start from {i + 2} apples, add {i + 3}, "
        f"ask the total (idea {k})."
    )


def rationales(seed_ids: list[str], k: int = 3) -> list[Rationale]:
    out = []
    for i, sid in enumerate(seed_ids):
        for s in range(k):
            out.append(
                Rationale(
                    seed_id=sid,
                    domain="math",
                    concepts=["addition of whole numbers", "counting"],
                    problem=problem(i),
                    text=rationale(i, s),
                    sample_index=s,
                    reward=-50.0 + 7.0 * ((s * 5 + i) % 3),
                    logp_problem=-30.0,
                    logp_rationale=-20.0,
                    rationale_model="q/base",
                    prompt_model="p/base",
                )
            )
    return out


def trainer_settings(tmp_path: Path, model: Path, **trainer: object) -> Settings:
    roles = ("prompt_model", "rationale_model", "solver")
    return Settings(
        trainer={"checkpoint_dir": tmp_path / "ckpt", **trainer},
        models={r: {"model": str(model)} for r in roles},
        metrics={"port": 0},
    )


def fast(lr: float = 3e-3, epochs: float = 1.0, **extra: object) -> dict:
    return {
        "lr": lr,
        "epochs": epochs,
        "batch_size": 4,
        "per_device_batch_size": 4,
        "max_seq_len": 512,
        "use_lora": False,
        **extra,
    }


def pairs(n: int) -> list[PreferencePair]:
    return [
        PreferencePair(
            problem_id=f"prob_{i}",
            domain="math",
            prompt=problem(i),
            chosen=f"We add {i + 2} and {i + 3}.\nThe answer is \\boxed{{{2 * i + 5}}}.",
            rejected=f"Apples are red.\nThe answer is \\boxed{{{i}}}.",
        )
        for i in range(n)
    ]

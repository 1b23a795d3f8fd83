#!/usr/bin/env python3
"""Golden fixtures from Hugging Face transformers for the Switchyard engine.

For each architecture, synthesize a tiny f32 model (seed 7) with `switchyard model synth`,
load it with AutoModelForCausalLM (eager attention, float32) and AutoTokenizer, and write
crates/engine/tests/fixtures/golden_{arch}.json with per-position logits and 32 greedy
tokens for three prompts, the HF tokenizer's ids for the text prompts, and the rendered chat
template. The Rust tests compare the engine (logits, greedy tokens) and the `tokens` crate
(ids, chat prompt) against these files.

See README.md next to this script for how to run it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[2]
ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
SIZE, DTYPE, SEED = "tiny", "f32", 7
NEW_TOKENS = 32
DEFAULT_SYNTH_CMD = (
    "cargo run --release -q -p switchyard -- model synth "
    "--out {out} --arch {arch} --size {size} --dtype {dtype} --seed {seed}"
)

# About 6 and 40 tokens with the tiny (512-entry) vocabulary; digits, punctuation,
# non-ASCII and a newline exercise the pre-tokenizer.
SHORT_PROMPT = "Hello, world!"
LONG_PROMPT = (
    "In 1984 the café on Main Street served 42 kinds of tea.\n"
    'She said: "Don\'t worry!"'
)
# Text only used for the tokenizer round trip.
ROUND_TRIP_TEXTS = [
    SHORT_PROMPT,
    LONG_PROMPT,
    "naïve Straße — 日本語 🚀 ½\n\n    fn main() { return 3.14159; }\t<tab>",
]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3 + 3?"},
]


def round_sig(x: float) -> float:
    """7 significant digits: f32 precision, and compact in JSON."""
    return float(f"{x:.7g}")


def synthesize(cmd: str, out: Path, arch: str) -> None:
    line = cmd.format(out=shlex.quote(str(out)), arch=arch, size=SIZE, dtype=DTYPE, seed=SEED)
    print(f"$ {line}", file=sys.stderr)
    subprocess.run(line, shell=True, check=True, cwd=REPO)


@torch.no_grad()
def greedy(model, ids: list[int]) -> tuple[list[int], float]:
    """Plain argmax continuation that never stops at EOS (and never suppresses it), and the
    smallest gap between the best and second-best logit over its steps (how close a
    reimplementation's rounding could come to flipping a token)."""
    seq = torch.tensor([ids])
    out, min_gap = [], float("inf")
    for _ in range(NEW_TOKENS):
        logits = model(seq).logits[0, -1]
        top = logits.topk(2).values
        min_gap = min(min_gap, float(top[0] - top[1]))
        nxt = int(logits.argmax())
        out.append(nxt)
        seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    return out, min_gap


@torch.no_grad()
def generate_check(model, tok, ids: list[int], expected: list[int]) -> str:
    """Cross-check the manual loop against model.generate (greedy, cached decoding)."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
    )[0, len(ids):].tolist()
    if out == expected:
        return "generate"
    if eos & set(expected):
        # min_new_tokens masks EOS, so generate legitimately differs once EOS is the argmax.
        return "manual (EOS is the argmax at some step; generate masks it)"
    raise SystemExit(f"model.generate disagrees with the greedy loop:\n{out}\n{expected}")


@torch.no_grad()
def case(model, tok, prompt: str | None, ids: list[int]) -> dict:
    logits = model(torch.tensor([ids])).logits[0].float()
    greedy_ids, min_gap = greedy(model, ids)
    return {
        "prompt": prompt,
        "prompt_ids": ids,
        "logits": [[round_sig(v) for v in row] for row in logits.tolist()],
        "greedy_ids": greedy_ids,
        "greedy_min_gap": round_sig(min_gap),
        "greedy_source": generate_check(model, tok, ids, greedy_ids),
    }


def fixture(model_dir: Path, arch: str) -> dict:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    vocab = model.config.vocab_size

    for text in ROUND_TRIP_TEXTS:
        back = tok.decode(tok.encode(text, add_special_tokens=False))
        if back != text:
            raise SystemExit(f"{arch}: tokenizer round trip changed {text!r} into {back!r}")

    chat_text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    chat_ids = tok(chat_text, add_special_tokens=False).input_ids

    cases = [
        case(model, tok, SHORT_PROMPT, tok(SHORT_PROMPT).input_ids),
        case(model, tok, LONG_PROMPT, tok(LONG_PROMPT).input_ids),
        case(model, tok, None, [i * 37 % vocab for i in range(100)]),
    ]
    return {
        "arch": arch,
        "size": SIZE,
        "dtype": DTYPE,
        "seed": SEED,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "vocab_size": vocab,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": model.generation_config.eos_token_id,
        "chat": {
            "messages": CHAT,
            "add_generation_prompt": True,
            "text": chat_text,
            "ids": chat_ids,
        },
        "cases": cases,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--synth-cmd",
        default=DEFAULT_SYNTH_CMD,
        help="command that writes a model; {out} {arch} {size} {dtype} {seed} are filled in "
        "(run from the repository root)",
    )
    ap.add_argument("--out-dir", type=Path, default=REPO / "crates/engine/tests/fixtures")
    ap.add_argument("--arch", action="append", choices=ARCHS, help="default: all")
    args = ap.parse_args()

    torch.manual_seed(0)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch or ARCHS:
            model_dir = Path(tmp) / arch
            synthesize(args.synth_cmd, model_dir, arch)
            data = fixture(model_dir, arch)
            path = args.out_dir / f"golden_{arch}.json"
            path.write_text(json.dumps(data, separators=(",", ":"), ensure_ascii=False) + "\n")
            gap = min(c["greedy_min_gap"] for c in data["cases"])
            print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB, min greedy gap {gap:.3g})")


if __name__ == "__main__":
    main()

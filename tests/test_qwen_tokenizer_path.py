"""The genuine Qwen2.5 BPE through the data, reward, rollout and CLI code (issue 14, item 3).

The other tests' tokenizers hold the reasoning tags as single tokens. Here the tokenizer is the one
Qwen2.5-Instruct ships (tests/conftest.py `qwen25_instruct_model_dir`, rebuilt offline): each tag is
several BPE tokens (`<start_working_out>` is `<`, `start`, `_working`, `_out`, `>`), the chat template
injects Qwen's default system prompt and has a tools branch, and the model (random, ~9.8M parameters)
has Qwen's 151,936 embedding rows and its hub generation_config (eos [<|im_end|>, <|endoftext|>],
top_k 20, top_p 0.8, repetition_penalty 1.1). Nothing is mocked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opensloth.config import resolve_config
from opensloth.data import prepare_grpo_dataset, prepare_sft_dataset
from opensloth.data.formats import reasoning_answer
from opensloth.data.synthetic import make_arithmetic_rows, write_rows
from opensloth.data.templates import REASONING_SYSTEM_PROMPT, WORK_START, reasoning_template
from opensloth.models.tiny import QWEN25_INSTRUCT_SYSTEM, QWEN25_VOCAB_SIZE, REASONING_TAGS
from opensloth.rewards.math import math_answer, math_format, math_number
from opensloth.rollout.hf import HFRolloutEngine

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
# OpenMathReasoning-like rows: <think> tags, LaTeX, and first words that BPE merges with the `>` of
# <start_working_out> when the whole conversation is tokenized at once (">The", ">$", ">(").
OPENMATH_ROWS = [
    {"problem": "Find $x$ if $2x = 84$.", "generated_solution": "<think>\nOkay, so $2x = 84$ gives x = 42.\n</think>",
     "expected_answer": "42"},
    {"problem": "What is 6 * 7?", "generated_solution": "The product 6*7 is 42.", "expected_answer": "42"},
    {"problem": "Simplify $\\frac{2}{4}$.", "generated_solution": "$\\frac{2}{4} = \\frac{1}{2}$",
     "expected_answer": "\\frac{1}{2}"},
    {"problem": "Compute (1 + 2) * 3.", "generated_solution": "(1 + 2) * 3 = 9", "expected_answer": "9"},
    *make_arithmetic_rows(2, seed=0, schema="openmath"),
]


@pytest.fixture(scope="module")
def tok(qwen25_instruct_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen25_instruct_model_dir)


def pieces(tok, ids) -> list[str]:
    return [tok.decode([i]) for i in ids]


def cfg_for(recipe: str, model: Path, dataset: Path, cache: Path, **over):
    return resolve_config(recipe, None, {"model": str(model), "dataset": str(dataset), "cache_dir": str(cache),
                                         **over})


def solution_of(row: dict) -> str:
    return row["generated_solution"].replace("<think>", "").replace("</think>", "").strip()


# ------------------------------------------------------------------------------ the tokenizer itself


def test_hub_shaped_tokenizer_and_model(tok, qwen25_instruct_model_dir):
    """What makes this path different from the other tests': multi-token tags, Qwen's own template."""
    assert len(tok) == 151_665 and tok.eos_token == IM_END and tok.pad_token == ENDOFTEXT and tok.bos_token is None
    assert pieces(tok, tok(WORK_START).input_ids) == ["<", "start", "_working", "_out", ">"]
    for tag in REASONING_TAGS:
        assert tag not in tok.get_vocab() and len(tok(tag).input_ids) >= 3, tag
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == (f"{IM_START}system\n{QWEN25_INSTRUCT_SYSTEM}{IM_END}\n{IM_START}user\nhi{IM_END}\n"
                    f"{IM_START}assistant\n")
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    conversation = [
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "add", "arguments": {"a": 2}}}]},
        {"role": "tool", "content": "5"}, {"role": "tool", "content": "ok"},
    ]
    text = tok.apply_chat_template(conversation, tools=tools, tokenize=False, add_generation_prompt=True)
    assert text.startswith(f"{IM_START}system\n{QWEN25_INSTRUCT_SYSTEM}\n\n# Tools\n")
    assert json.dumps(tools[0]) in text and text.count(f"{IM_START}system") == 1
    assert (f"{IM_START}assistant\n<tool_call>\n{{\"name\": \"add\", \"arguments\": {{\"a\": 2}}}}\n</tool_call>{IM_END}\n"
            f"{IM_START}user\n<tool_response>\n5\n</tool_response>\n<tool_response>\nok\n</tool_response>{IM_END}\n"
            f"{IM_START}assistant\n") in text
    config = json.loads((qwen25_instruct_model_dir / "config.json").read_text())
    assert config["vocab_size"] == QWEN25_VOCAB_SIZE > len(tok)


# ------------------------------------------------------------------------------ SFT data: masks


@pytest.mark.parametrize("chat_template", ["auto", "model"])
def test_openmath_sft_masks_token_by_token(tok, qwen25_instruct_model_dir, tmp_path, chat_template):
    """Prepared through the real pipeline: 1 on exactly the assistant turn's tokens and its <|im_end|>."""
    data = write_rows(OPENMATH_ROWS, tmp_path / "sft.jsonl")
    cfg = cfg_for("sft", qwen25_instruct_model_dir, data, tmp_path / "cache", format="openmath-reasoning",
                  chat_template=chat_template)
    rows = prepare_sft_dataset(cfg, tok, 1).load_all()
    assert len(rows) == len(OPENMATH_ROWS)
    by_problem = {r["problem"]: r for r in OPENMATH_ROWS}
    im_end = tok.convert_tokens_to_ids(IM_END)
    for row in rows:
        ids, mask = row["input_ids"], row["assistant_masks"]
        first, last = mask.index(1), len(mask) - 1 - mask[::-1].index(1)
        assert mask[first:last + 1] == [1] * (last - first + 1)  # one contiguous run ...
        assert last == len(ids) - 2 and ids[last] == im_end and pieces(tok, ids[last + 1:]) == ["\n"]  # ... to <|im_end|>
        prompt = tok.decode(ids[:first])
        problem = prompt.split(f"{IM_START}user\n")[1].split(IM_END)[0]
        source = by_problem[problem]
        assert tok.decode(ids[first:last + 1]) == reasoning_answer(solution_of(source), source["expected_answer"]) + IM_END
        # The opening tag is trained on as its BPE pieces; system and user turns are not trained on.
        assert pieces(tok, ids[first:first + 4]) == ["<", "start", "_working", "_out"]
        if chat_template == "auto":  # the reasoning template's generation prompt ends there: a cut
            assert pieces(tok, ids[first + 4:first + 5]) == [">"]
        assert prompt == (f"{IM_START}system\n{REASONING_SYSTEM_PROMPT}{IM_END}\n{IM_START}user\n{problem}{IM_END}\n"
                          f"{IM_START}assistant\n")
        assert QWEN25_INSTRUCT_SYSTEM not in tok.decode(ids)


def test_tool_conversations_under_qwens_template(tok, qwen25_instruct_model_dir, tmp_path):
    """Tool results render as Qwen's <tool_response> user turn and are not trained on; structured
    `tool_calls` (which the chat format would silently drop from the training text) are refused."""
    from opensloth.errors import UserError

    call = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    in_content = [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": call},
                  {"role": "tool", "content": "5"}, {"role": "assistant", "content": "It is 5."}]
    structured = [{"role": "user", "content": "2+3?"},
                  {"role": "assistant", "content": "Let me add.",
                   "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": "{}"}}]},
                  {"role": "tool", "content": "5"}, {"role": "assistant", "content": "It is 5."}]
    data = write_rows([{"messages": in_content}, {"messages": structured}], tmp_path / "tools.jsonl")
    cfg = cfg_for("sft", qwen25_instruct_model_dir, data, tmp_path / "cache", format="chat", chat_template="model")
    with pytest.raises(UserError, match="has 'tool_calls', which this format does not train on"):
        prepare_sft_dataset(cfg, tok, 1)
    cfg = cfg_for("sft", qwen25_instruct_model_dir, data, tmp_path / "cache", format="chat", chat_template="model",
                  skip_bad_rows=True)
    prepared = prepare_sft_dataset(cfg, tok, 1)
    assert prepared.stats.bad_rows == 1
    (row,) = prepared.load_all()
    ids, mask = row["input_ids"], row["assistant_masks"]
    runs, current = [], []
    for i, m in zip(ids + [None], mask + [0]):
        if m:
            current.append(i)
        elif current:
            runs, current = runs + [tok.decode(current)], []
    assert runs == [call + IM_END, "It is 5." + IM_END]
    assert f"{IM_START}user\n<tool_response>\n5\n</tool_response>{IM_END}" in tok.decode(ids)
    assert tok.decode(ids).startswith(f"{IM_START}system\n{QWEN25_INSTRUCT_SYSTEM}{IM_END}")


SYSTEM_CASES = [
    # (recipe, format, --chat-template, --system-prompt, expected system turn, generation prompt tail)
    ("sft", "openmath-reasoning", "auto", None, REASONING_SYSTEM_PROMPT, None),
    ("sft", "openmath-reasoning", "auto", "Think.", "Think.", None),
    ("sft", "openmath-reasoning", "model", None, REASONING_SYSTEM_PROMPT, None),
    ("sft", "chat", "model", None, QWEN25_INSTRUCT_SYSTEM, None),
    ("sft", "chat", "model", "Think.", "Think.", None),
    ("grpo", "dapo-math", "auto", None, REASONING_SYSTEM_PROMPT, f"{IM_START}assistant\n{WORK_START}"),
    ("grpo", "dapo-math", "auto", "Think.", "Think.", f"{IM_START}assistant\n{WORK_START}"),
    ("grpo", "dapo-math", "model", None, REASONING_SYSTEM_PROMPT, f"{IM_START}assistant\n"),
    ("grpo", "prompt-answer", "model", None, QWEN25_INSTRUCT_SYSTEM, f"{IM_START}assistant\n"),
    ("grpo", "prompt-answer", "model", "Think.", "Think.", f"{IM_START}assistant\n"),
]


@pytest.mark.parametrize("recipe, fmt, template, system_prompt, system, tail", SYSTEM_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{'system' if c[3] else 'none'}" for c in SYSTEM_CASES])
def test_system_turn_with_and_without_system_prompt(tok, qwen25_instruct_model_dir, tmp_path, recipe, fmt,
                                                    template, system_prompt, system, tail):
    """Exactly one system turn: --system-prompt when given; else the math formats' reasoning prompt;
    else (a plain conversation under Qwen's own template) Qwen's default one."""
    source = {"openmath-reasoning": OPENMATH_ROWS[1],
              "chat": {"messages": [{"role": "user", "content": "What is 6 * 7?"},
                                    {"role": "assistant", "content": "42"}]},
              "dapo-math": {"prompt": "What is 6 * 7?", "solution": "42"},
              "prompt-answer": {"prompt": "What is 6 * 7?", "answer": "42"}}[fmt]
    data = write_rows([source], tmp_path / "rows.jsonl")
    cfg = cfg_for(recipe, qwen25_instruct_model_dir, data, tmp_path / "cache", format=fmt, chat_template=template,
                  system_prompt=system_prompt)
    if recipe == "sft":
        row = prepare_sft_dataset(cfg, tok, 1).load_all()[0]
        text = tok.decode(row["input_ids"])
        trained = tok.decode([i for i, m in zip(row["input_ids"], row["assistant_masks"]) if m])
        assert trained.endswith(("42" if fmt == "chat" else "<SOLUTION>42</SOLUTION>") + IM_END)
        assert system not in trained and "What is" not in trained
    else:
        row = prepare_grpo_dataset(cfg, tok, 1).load_all()[0]
        text = row["prompt_text"]
        assert tok.decode(row["prompt_ids"]) == text and text.endswith(tail)
    assert text.startswith(f"{IM_START}system\n{system}{IM_END}\n{IM_START}user\nWhat is 6 * 7?{IM_END}\n")
    assert text.count(f"{IM_START}system") == 1


def test_sft_rows_begin_with_the_tokens_grpo_prompts_with(tok, qwen25_instruct_model_dir, tmp_path):
    """The GRPO prompt ends inside the SFT text (after <start_working_out>); tokenized whole, BPE merged
    its last `>` with the solution's first word (`>The`, `>$`, `>(`), so SFT never trained the model
    to continue from the prompt GRPO, eval and generate give it. Each SFT row must start with exactly
    the prompt's tokens."""
    sft = prepare_sft_dataset(cfg_for("sft", qwen25_instruct_model_dir, write_rows(OPENMATH_ROWS, tmp_path / "s.jsonl"),
                                      tmp_path / "cache", format="openmath-reasoning"), tok, 1).load_all()
    dapo = [{"prompt": r["problem"], "solution": r["expected_answer"]} for r in OPENMATH_ROWS]
    grpo = prepare_grpo_dataset(cfg_for("grpo", qwen25_instruct_model_dir, write_rows(dapo, tmp_path / "g.jsonl"),
                                        tmp_path / "cache", format="dapo-math", task="math",
                                        prompt_length_percentile=1.0), tok, 1).load_all()
    prompt_ids = {row["prompt"][-1]["content"]: row["prompt_ids"] for row in grpo}
    assert len(prompt_ids) == len(OPENMATH_ROWS)
    for row in sft:
        text = tok.decode(row["input_ids"])
        problem = text.split(f"{IM_START}user\n")[1].split(IM_END)[0]
        prompt = prompt_ids[problem]
        assert row["input_ids"][:len(prompt)] == prompt, (problem, pieces(tok, row["input_ids"][len(prompt) - 2:][:4]))
        # The tokens after the prompt are what the model generates: the working, then the rest.
        assert row["assistant_masks"][len(prompt)] == 1


def test_no_cuts_for_tokenizers_that_start_every_input_with_a_word_boundary(tok):
    """SentencePiece-style tokenizers (Llama 2, Mistral) would gain a space at each cut: not cut there."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from opensloth.data.sft_rows import piecewise_tokenization_is_exact
    from opensloth.models.tiny import build_byte_tokenizer

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "\u2581Hi": 1, "\u2581there": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.decoder = decoders.Metaspace(prepend_scheme="first")
    sentencepiece_like = PreTrainedTokenizerFast(tokenizer_object=backend)
    assert sentencepiece_like.decode(sentencepiece_like("there").input_ids) == "there"
    assert not piecewise_tokenization_is_exact(sentencepiece_like)
    assert piecewise_tokenization_is_exact(tok) and piecewise_tokenization_is_exact(build_byte_tokenizer())


# ------------------------------------------------------------------------------ rewards on BPE text


def test_multi_token_tags_round_trip_and_get_full_credit(tok):
    """Decoded as the rollout engine decodes (skip_special_tokens=True), split tags are intact."""
    working = "6 * 7 = 42, since 6 * 7 = 6 * 5 + 6 * 2 = 30 + 12."
    full = f"{WORK_START}{working}<end_working_out><SOLUTION>42</SOLUTION>"
    for completion in (full, full[len(WORK_START):]):  # GRPO's prompt already holds the opening tag
        ids = tok(completion + IM_END, add_special_tokens=False).input_ids
        assert len(ids) > len(tok(working).input_ids) + 4 * 3  # every tag is at least 3 tokens
        decoded = tok.batch_decode([ids], skip_special_tokens=True)[0]
        assert decoded == completion
        assert "".join(pieces(tok, ids)) == completion + IM_END  # token by token, as a streamer prints it
        with_special = tok.decode(ids)  # an engine that keeps special tokens
        for text in (decoded, with_special):
            assert math_format([""], [text]) == [1.0]
            assert math_answer([""], [text], answer=["42"]) == [1.0]
            assert math_number([""], [text], answer=["42"]) == [1.0]
        assert math_answer([""], [decoded], answer=["41"]) == [0.0]
    # A tag that lost a piece is not the format (the reward reads text, not token ids).
    broken = tok.decode(tok(full).input_ids[:-1])  # without the final ">"
    assert broken.endswith("</SOLUTION") and math_format([""], [broken]) == [pytest.approx(1 / 3)]


# ------------------------------------------------------------------------------ rollout: stop tokens


def _steer(model, sequences: list[list[int]], starts: list[int], margin: float = 40.0) -> None:
    """Make greedy decoding continue each sequence from `starts[i]` on, exactly, by editing the output
    head: an untied copy of the embeddings whose rows for the target tokens are solved (least squares
    over the random model's own final hidden states) to score `margin` at their positions, 0 elsewhere."""
    with torch.no_grad():
        states, targets = [], []
        for seq, start in zip(sequences, starts):
            hidden = model.model(input_ids=torch.tensor([seq])).last_hidden_state[0]  # (T, H)
            states.append(hidden[start - 1:len(seq) - 1])
            targets += seq[start:]
        H = torch.cat(states).double()  # (N, H): N positions, each predicting targets[n]
        rows = sorted(set(targets))
        Y = torch.zeros(len(targets), len(rows), dtype=torch.float64)  # (N, R)
        for n, t in enumerate(targets):
            Y[n, rows.index(t)] = margin
        W = torch.linalg.lstsq(H, Y).solution.T  # (R, H) with H @ W.T = Y
        head = model.get_output_embeddings().weight.detach().clone()
        head[rows] = W.float()
        model.lm_head.weight = torch.nn.Parameter(head)  # untied: the input embeddings stay random


def test_engine_stops_at_im_end_and_endoftext(tok, qwen25_instruct_model_dir):
    """Both of Qwen2.5-Instruct's stop tokens end a completion there, though the model would go on."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(qwen25_instruct_model_dir).eval()
    engine = HFRolloutEngine(model, tok)
    im_end, endoftext = tok.convert_tokens_to_ids([IM_END, ENDOFTEXT])
    assert im_end in engine.eos_ids and endoftext in engine.eos_ids  # eos + the hub generation_config's list

    template = reasoning_template()
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True,
                                       chat_template=template) for q in ("What is 6 * 7?", "What is 5 + 5?")]
    completions = ["6*7=42<end_working_out><SOLUTION>42</SOLUTION>", "5+5=10<end_working_out><SOLUTION>10</SOLUTION>"]
    after = tok(" and then more text", add_special_tokens=False).input_ids  # what the model would say next
    prompt_ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    wanted = [tok(c, add_special_tokens=False).input_ids + [stop] for c, stop in zip(completions, (im_end, endoftext))]
    _steer(model, [p + w + after for p, w in zip(prompt_ids, wanted)], [len(p) for p in prompt_ids])

    max_new = len(max(wanted, key=len)) + len(after) + 4
    batch = engine.generate(prompts, group_size=2, max_new_tokens=max_new, greedy=True)
    for row in range(4):
        want = wanted[row // 2]
        n = int(batch.completion_mask[row].sum())
        assert n == len(want) and not batch.is_truncated[row]  # ended at its stop token, included in the mask
        assert batch.completion_ids[row, :n].tolist() == want
        assert (batch.completion_ids[row, n:] == engine.pad_id).all()
        assert batch.completions_text[row] == completions[row // 2]
    # The model itself would have gone on past the stop token.
    with torch.no_grad():
        seq = torch.tensor([prompt_ids[0] + wanted[0]])
        assert model(seq).logits[0, -1].argmax().item() == after[0]
    # What GRPO then scores: the decoded completions, multi-token tags and all.
    texts = batch.completions_text
    assert math_format([""] * 4, texts) == [1.0] * 4
    assert math_answer([""] * 4, texts, answer=["42", "42", "10", "10"]) == [1.0] * 4


def test_engine_samples_the_full_vocabulary_despite_the_hub_generation_config(tok, qwen25_instruct_model_dir):
    """The hub's top_k=20 / top_p=0.8 / temperature 0.7 must not reach rollouts: the policy-gradient
    log-probs are over the full vocabulary at temperature 1."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(qwen25_instruct_model_dir).eval()
    assert model.generation_config.top_k == 20
    engine = HFRolloutEngine(model, tok)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    batch = engine.generate([prompt], group_size=4, max_new_tokens=6, seed=0)
    P = batch.prompt_ids.shape[1]
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, P + T, V)
    ranks = []
    for row in range(4):
        for t in range(int(batch.completion_mask[row].sum())):
            step = logits[row, P + t - 1]
            ranks.append(int((step > step[batch.completion_ids[row, t]]).sum()))
    assert max(ranks) >= 20, ranks  # top_k=20 would keep every rank below 20


# ------------------------------------------------------------------------------ the CLI, end to end


def _run(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`os-train ...` (module train) or `os ...` (module main) as a user runs it: a fresh process."""
    proc = subprocess.run([sys.executable, "-c", f"from opensloth.cli.{module} import app; app()", *args],
                          check=False, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "COLUMNS": "200"})
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_sft_grpo_eval_export_generate_with_the_real_bpe(qwen25_instruct_model_dir, tmp_path):
    """os-train sft --format openmath-reasoning -> os-train grpo --format dapo-math --task math (continuing
    the SFT adapter) -> os eval -> os export -> os generate, on the hub-shaped tokenizer and vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    sft_data = write_rows(make_arithmetic_rows(16, seed=0, schema="openmath"), tmp_path / "sft.jsonl")
    grpo_data = write_rows(make_arithmetic_rows(8, seed=1, schema="dapo"), tmp_path / "grpo.jsonl")
    eval_data = write_rows(make_arithmetic_rows(3, seed=2, schema="dapo"), tmp_path / "eval.jsonl")
    common = ["--devices", "cpu", "--cache-dir", str(tmp_path / "cache"), "--report-to", "none", "--seed", "0"]
    sft, grpo, merged = tmp_path / "sft", tmp_path / "grpo", tmp_path / "merged"

    _run("train", "sft", "--model", str(qwen25_instruct_model_dir), "--dataset", str(sft_data), "--format",
         "openmath-reasoning", "--output-dir", str(sft), "--max-steps", "3", "--per-device-train-batch-size", "2",
         "--max-seq-length", "128", "--learning-rate", "1e-3", *common, cwd=tmp_path)
    assert (sft / "adapter_config.json").is_file()
    saved = AutoTokenizer.from_pretrained(sft)
    assert len(saved) == 151_665  # no tokens were added to the hub tokenizer
    assert saved.chat_template == reasoning_template()  # what `auto` chose for the math format, saved with it
    losses = [r["loss"] for r in map(json.loads, (sft / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses and all(x == x for x in losses)

    # A reward that varies with the text, beside the math preset (which a random model never earns), so
    # the GRPO steps have advantages, gradients and a KL to the starting policy (the SFT adapter).
    chars = tmp_path / "chars.py"
    chars.write_text("def completion_chars(completions, **kwargs):\n"
                     "    return [len(c if isinstance(c, str) else c[0]['content']) / 50 for c in completions]\n")
    _run("train", "grpo", "--model", str(sft), "--dataset", str(grpo_data), "--format", "dapo-math", "--task", "math",
         "--reward-module", str(chars), "--rewards", "completion_chars", "--output-dir", str(grpo), "--max-steps", "2",
         "--group-size", "2", "--rollout-batch-size", "2", "--per-device-train-batch-size", "4", "--max-new-tokens", "8",
         "--learning-rate", "1e-2", *common, cwd=tmp_path)
    steps = [r for r in map(json.loads, (grpo / "metrics.jsonl").read_text().splitlines()) if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert 0 < r["completions/mean_length"] <= 8 and r["loss"] == r["loss"]
        assert {"rewards/math_format/mean", "rewards/math_answer/mean", "rewards/completion_chars/mean"} <= set(r)
    assert steps[0]["grad_norm"] > 0
    # The KL reference is the policy GRPO starts from, the SFT adapter: none at step 1, some after an update.
    assert steps[0]["kl"] == pytest.approx(0, abs=1e-6) and steps[1]["kl"] > 0
    assert (grpo / "adapter_config.json").is_file()
    assert json.loads((grpo / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        qwen25_instruct_model_dir)

    results = tmp_path / "eval.jsonl"
    proc = _run("main", "eval", "--model", str(grpo), "--dataset", str(eval_data), "--format", "dapo-math", "--task",
                "math", "--max-new-tokens", "8", "--output", str(results), cwd=tmp_path)
    assert "pass@1" in proc.stdout
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(records) == 3
    for record in records:
        assert record["prompt"].startswith(f"{IM_START}system\n{REASONING_SYSTEM_PROMPT}{IM_END}")
        assert record["prompt"].endswith(f"{IM_START}assistant\n{WORK_START}")
        assert set(record["rewards"]) == {"math_format", "math_answer", "math_number"}

    _run("main", "export", "--model", str(grpo), "--output", str(merged), "--dtype", "float32", cwd=tmp_path)
    assert not (merged / "adapter_config.json").exists()
    assert AutoConfig.from_pretrained(merged).vocab_size == QWEN25_VOCAB_SIZE
    assert set(GenerationConfig.from_pretrained(merged).eos_token_id) == {151645, 151643}
    assert len(AutoTokenizer.from_pretrained(merged)) == 151_665

    proc = _run("main", "generate", "--model", str(merged), "What is 2 + 3?", "--max-new-tokens", "8", cwd=tmp_path)
    # The merged weights with the saved (reasoning) template, greedy, stopping at either stop token.
    model, merged_tok = AutoModelForCausalLM.from_pretrained(merged), AutoTokenizer.from_pretrained(merged)
    prompt = merged_tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt.endswith(f"{IM_START}assistant\n{WORK_START}")
    ids = merged_tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, do_sample=False, max_new_tokens=8, repetition_penalty=1.0, eos_token_id=[151645, 151643],
                         pad_token_id=151643)
    expected = merged_tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert expected and proc.stdout.strip().endswith(expected)

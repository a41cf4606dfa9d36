"""SFT rows: render each conversation with the chat template, tokenize it, and mark the assistant tokens.

Each row is `input_ids` and `assistant_masks` (1 exactly on the tokens of each assistant turn's
content and its closing end-of-turn token, 0 on system/user turns and on the template's own
tokens such as `<|im_start|>assistant\\n`), truncated to --max-seq-length. TRL's SFTTrainer
turns `assistant_masks` into labels (-100 where 0) for such pre-tokenized rows. The `text`
format has no turns: every token counts (mask all 1); so does every row with
--no-assistant-only-loss. A chat row is tokenized in pieces cut where each assistant turn's prompt
(the turns before it and the generation prompt) ends, so it starts with exactly the tokens GRPO,
eval and generate give the model (`generation_prompt_ends`; not for tokenizers that mark a word
start at every input's start, see `piecewise_tokenization_is_exact`).

Assistant masks without template markers. For assistant turn i, the conversation up to turn i
and up to turn i+1 are rendered; the text between them is that turn, and the turn's content is
located in it (its last occurrence) up to the end of the turn minus trailing whitespace (which
keeps the end-of-turn token, drops the newline after it). Tokens whose character span (from the
fast tokenizer's offsets) overlaps that range get 1. This works for any template that renders a
conversation's prefix as a prefix of the whole, which the usual ones (ChatML, Llama 3, Mistral,
Gemma) do; a template that does not is refused with a clear message (`assistant_char_spans`).
"""

from __future__ import annotations

import logging
from typing import Any

from opensloth.config import RunConfig
from opensloth.data.formats import format_sft_row
from opensloth.data.rows import TOKENIZE_CHUNK, data_progress, format_train_and_eval, split_eval
from opensloth.data.stats import PrepStats, SFTTokenStats
from opensloth.data.templates import render
from opensloth.errors import UserError, plural

logger = logging.getLogger("opensloth")


def assistant_char_spans(tokenizer: Any, messages: list[dict],
                         chat_template: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages` and find each assistant turn's [start, end) characters in the text.

    Returns:
        (text, spans): the rendered conversation and, per assistant turn, the range from its
        content's first character to its end-of-turn token's last (module docstring).

    Raises:
        UserError: the template renders a prefix of the conversation differently from the whole.
    """
    full = render(tokenizer, messages, chat_template=chat_template)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render_prefix(tokenizer, messages[:i], chat_template)
        upto = render(tokenizer, messages[: i + 1], chat_template=chat_template)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise UserError(
                "The chat template renders the start of a conversation differently from the whole (e.g. it "
                "rewrites earlier assistant turns), so the assistant tokens cannot be located. Use "
                "--chat-template chatml or a Jinja file, or --no-assistant-only-loss."
            )
        turn = upto[len(before):]
        start = turn.rfind(message["content"].strip())
        if start < 0:
            raise UserError("The chat template changes the assistant message text, so its tokens cannot be "
                            "located. Use --chat-template chatml or a Jinja file.")
        spans.append((len(before) + start, len(before) + len(turn.rstrip())))
    return full, spans


def _render_prefix(tokenizer: Any, messages: list[dict], chat_template: str | None) -> str:
    """The rendered text of the turns before an assistant turn ("" or the template's preamble for none)."""
    if messages:
        return render(tokenizer, messages, chat_template=chat_template)
    try:  # some templates cannot render an empty conversation
        return tokenizer.apply_chat_template([], tokenize=False, chat_template=chat_template)
    except Exception:  # noqa: BLE001
        return ""


def generation_prompt_ends(tokenizer: Any, messages: list[dict], chat_template: str | None, full: str) -> list[int]:
    """Where, in the rendered conversation `full`, each assistant turn's prompt ends: the text of
    the turns before it plus the generation prompt, when `full` starts with that text.

    GRPO, `os eval` and `os generate` tokenize exactly that prompt and the model continues from its
    last token. A BPE tokenizer given the whole conversation may merge across that point: with
    Qwen2.5's BPE and the reasoning template (whose generation prompt ends with
    `<start_working_out>`), "<start_working_out>The" ends in the token `>The`, where the prompt alone
    ends in `>`. `tokenize_at_cuts` cuts the text there (when `piecewise_tokenization_is_exact`), so
    SFT trains on the token sequences the model is later prompted with.
    """
    ends = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i == 0:
            continue
        try:
            prompt = render(tokenizer, messages[:i], add_generation_prompt=True, chat_template=chat_template)
        except UserError:  # a template that cannot render this prefix: no cut, as before
            continue
        if full.startswith(prompt):
            ends.append(len(prompt))
    return ends


def piecewise_tokenization_is_exact(tokenizer: Any) -> bool:
    """Does tokenizing a text in two pieces give back the text? Yes for byte-level BPE (GPT-2, Llama 3,
    Qwen); no for SentencePiece-style tokenizers that start every input with a word boundary
    (Llama 2, Mistral: "there" alone is "▁there"), for which `tokenize_at_cuts` must not cut."""
    pieces = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("Hi", "there")]
    return tokenizer.decode(pieces[0] + pieces[1]) == "Hithere"


def tokenize_at_cuts(tokenizer: Any, texts: list[str], cuts: list[list[int]],
                     offsets: bool = True) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Tokenize each text as its pieces between `cuts` (character positions), concatenated: no token
    spans a cut. Returns (ids, character offsets into the whole text; empty without `offsets`) per text.
    Without cuts this is the tokenizer on the whole text."""
    pieces, owners = [], []
    for row, (text, row_cuts) in enumerate(zip(texts, cuts, strict=True)):
        bounds = [0, *sorted({c for c in row_cuts if 0 < c < len(text)}), len(text)]
        for start, end in zip(bounds, bounds[1:]):
            pieces.append(text[start:end])
            owners.append((row, start))
    enc = tokenizer(pieces, add_special_tokens=False, return_offsets_mapping=offsets)
    out: list[tuple[list[int], list[tuple[int, int]]]] = [([], []) for _ in texts]
    for k, (row, start) in enumerate(owners):
        out[row][0].extend(enc["input_ids"][k])
        if offsets:
            out[row][1].extend((a + start, b + start) for a, b in enc["offset_mapping"][k])
    return out


def spans_to_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose [start, end) characters overlap an assistant span, else 0.

    Tokens of zero width (none in byte-level tokenizers) count when their start is inside a span.
    """
    mask = []
    for a, b in offsets:
        inside = any((a < e and b > s) or (a == b and s <= a < e) for s, e in spans)
        mask.append(int(inside))
    return mask


def build_sft(cfg: RunConfig, tokenizer: Any, template: str, fmt: str, source, eval_source,
              system: str | None) -> tuple[Any, Any, PrepStats]:
    """(training rows, held-out rows or None, stats): `source` (and `eval_source`) formatted in the seeded
    order, tokenized with assistant masks and truncated; --eval-split-ratio holds out the last rows.

    Raises:
        UserError: a malformed row (without --skip-bad-rows), a template whose assistant tokens cannot
            be located, or no row left.
    """
    import datasets

    d = cfg.data
    stats = PrepStats(rows_in=len(source))
    rows, eval_rows = format_train_and_eval(cfg, source, eval_source, fmt, format_sft_row, system, stats)
    # --no-assistant-only-loss trains on every token: no masks to locate (mask all 1).
    only_assistant = cfg.sft.assistant_only_loss
    train, stats.sft = tokenize_sft(tokenizer, template, [r for _, r in rows], fmt, d.max_seq_length, only_assistant)
    held_out = (tokenize_sft(tokenizer, template, [r for _, r in eval_rows], fmt, d.max_seq_length,
                             only_assistant)[0] if eval_rows else None)  # its counts are not reported
    if not train["input_ids"]:
        raise UserError("No usable SFT rows are left (see the bad-row and truncation counts). Check --dataset, "
                        "--format and --max-seq-length.")
    n_eval = split_eval(len(train["input_ids"]), d.eval_split_ratio) if held_out is None else 0
    if n_eval:
        held_out = {k: v[-n_eval:] for k, v in train.items()}
        train = {k: v[:-n_eval] for k, v in train.items()}
    stats.num_rows = len(train["input_ids"])
    stats.eval_rows = len(held_out["input_ids"]) if held_out else 0
    to_ds = datasets.Dataset.from_dict
    return to_ds(train), (to_ds(held_out) if held_out else None), stats


def tokenize_sft(tokenizer: Any, template: str, items: list, fmt: str, max_len: int,
                 only_assistant: bool = True) -> tuple[dict[str, list], SFTTokenStats]:
    """Rendered, tokenized, masked and truncated rows (`input_ids`, `assistant_masks` columns), and
    their counts. A row with no assistant token left after truncation is dropped (counted)."""
    out: dict[str, list] = {"input_ids": [], "assistant_masks": []}
    counts = SFTTokenStats(max_seq_length=max_len)
    can_cut = fmt != "text" and piecewise_tokenization_is_exact(tokenizer)
    with data_progress("tokenize", len(items)) as progress:
        for chunk_start in range(0, len(items), TOKENIZE_CHUNK):
            progress.update(chunk_start)
            chunk = items[chunk_start: chunk_start + TOKENIZE_CHUNK]
            if fmt == "text":
                encoded = tokenizer(chunk, add_special_tokens=True)["input_ids"]
                eos = tokenizer.eos_token_id
                pairs = [(ids + ([eos] if eos is not None and (not ids or ids[-1] != eos) else []), None)
                         for ids in encoded]
                pairs = [(ids, [1] * len(ids)) for ids, _ in pairs]
            else:
                if only_assistant:
                    rendered = [assistant_char_spans(tokenizer, messages, template) for messages in chunk]
                    if not getattr(tokenizer, "is_fast", False):
                        raise UserError("Assistant-only labels need a fast tokenizer (character offsets); "
                                        f"{getattr(tokenizer, 'name_or_path', 'this model')} has a slow one.")
                else:
                    rendered = [(render(tokenizer, messages, chat_template=template), []) for messages in chunk]
                cuts = [generation_prompt_ends(tokenizer, messages, template, text) if can_cut else []
                        for messages, (text, _) in zip(chunk, rendered)]
                encoded = tokenize_at_cuts(tokenizer, [text for text, _ in rendered], cuts, offsets=only_assistant)
                pairs = [(ids, spans_to_mask(offsets, spans) if only_assistant else [1] * len(ids))
                         for (ids, offsets), (_, spans) in zip(encoded, rendered)]
            for ids, mask in pairs:
                counts.longest_row_tokens = max(counts.longest_row_tokens, len(ids))
                if len(ids) > max_len:
                    counts.truncated_rows += 1
                    ids, mask = ids[:max_len], mask[:max_len]
                if not any(mask):  # nothing to learn from (all assistant tokens cut off)
                    counts.dropped_no_assistant_tokens += 1
                    continue
                out["input_ids"].append(list(ids))
                out["assistant_masks"].append(mask)
                counts.tokens += len(ids)
                counts.assistant_tokens += sum(mask)
        progress.update(len(items))
    if counts.truncated_rows:
        logger.warning("%s longer than --max-seq-length %d truncated", plural(counts.truncated_rows, "row"), max_len)
    return out, counts

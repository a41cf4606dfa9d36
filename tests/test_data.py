"""Data pipeline: formats, templates, assistant masks, truncation, cache, bad rows, shards, file kinds.

Real tokenizers only: the tiny byte-level tokenizer of `opensloth.models.tiny` and the real
Qwen2.5 tokenizer (session fixtures in conftest.py).
"""

from __future__ import annotations

import json
import time

import datasets
import pytest
from transformers import AutoTokenizer

from opensloth.config import DataConfig, resolve_config
from opensloth.data import (
    check_shards,
    find_cached,
    load_prepared,
    prepare_grpo_dataset,
    prepare_sft_dataset,
    reshard,
)
from opensloth.data.formats import BadRow, detect_format, format_grpo_row, format_sft_row
from opensloth.data.grpo_prompts import nearest_rank
from opensloth.data.sft_rows import assistant_char_spans, spans_to_mask
from opensloth.data.synthetic import make_arithmetic_rows, write_rows
from opensloth.data.templates import REASONING_SYSTEM_PROMPT, apply_chat_template, chatml_template, render
from opensloth.errors import UserError


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def sft_file(tmp_path):
    return write_rows(make_arithmetic_rows(24, seed=0, schema="openmath"), tmp_path / "sft.jsonl")


def sft_cfg(model, dataset, cache, **over):
    return resolve_config("sft", None, {"model": str(model), "dataset": str(dataset), "cache_dir": str(cache), **over})


def grpo_cfg(model, dataset, cache, **over):
    return resolve_config("grpo", None, {"model": str(model), "dataset": str(dataset), "cache_dir": str(cache), **over})


def masked_text(tokenizer, row) -> str:
    return tokenizer.decode([i for i, m in zip(row["input_ids"], row["assistant_masks"]) if m])


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And assistant + 1?"},
    {"role": "assistant", "content": "5, said the assistant"},
]


# ------------------------------------------------------------------------------------------ formats


def test_synthetic_rows_are_seeded_short_and_correct():
    rows = make_arithmetic_rows(50, seed=3, schema="openmath")
    assert rows == make_arithmetic_rows(50, seed=3, schema="openmath")
    assert rows != make_arithmetic_rows(50, seed=4, schema="openmath")
    for row in rows:
        a, op, b = row["problem"].removeprefix("What is ").removesuffix("?").split()
        assert int(row["expected_answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0
        assert len(row["problem"]) <= 15 and row["generated_solution"].endswith("=" + row["expected_answer"])
    assert set(make_arithmetic_rows(1, 0, "dapo")[0]) == {"prompt", "solution"}
    assert make_arithmetic_rows(1, 0, "gsm8k")[0]["answer"].endswith("#### " + make_arithmetic_rows(1, 0, "dapo")[0]["solution"])


def test_sft_formatters():
    om = format_sft_row("openmath-reasoning", {"problem": "1+1?", "generated_solution": "<think>1+1=2</think>",
                                               "expected_answer": 2})
    assert om == [{"role": "system", "content": REASONING_SYSTEM_PROMPT}, {"role": "user", "content": "1+1?"},
                  {"role": "assistant", "content": "<start_working_out>1+1=2<end_working_out><SOLUTION>2</SOLUTION>"}]
    assert format_sft_row("openmath-reasoning", {"problem": "p", "generated_solution": "s", "expected_answer": "a"},
                          "Mine")[0]["content"] == "Mine"
    pc = format_sft_row("prompt-completion", {"prompt": "hi", "completion": "there"}, "Sys")
    assert [m["role"] for m in pc] == ["system", "user", "assistant"] and pc[2]["content"] == "there"
    pc_msgs = format_sft_row("prompt-completion", {"prompt": [{"role": "user", "content": "a"}],
                                                   "completion": [{"role": "assistant", "content": "b"}]})
    assert pc_msgs == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    sharegpt = format_sft_row("chat", {"messages": None, "conversations": [{"from": "human", "value": "q"},
                                                                             {"from": "gpt", "value": "r"}]})
    assert sharegpt == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]
    assert format_sft_row("text", {"text": "plain"}) == "plain"


def test_grpo_formatters():
    msgs, answer, extra = format_grpo_row("dapo-math", {"prompt": "Find x.", "solution": 12})
    assert msgs == [{"role": "system", "content": REASONING_SYSTEM_PROMPT}, {"role": "user", "content": "Find x."}]
    assert answer == "12" and extra == {}
    msgs, answer, extra = format_grpo_row("gsm8k", {"question": "q?", "answer": "work\n#### 1,234"})
    assert answer == "1234" and extra == {"reference_solution": "work\n#### 1,234"}
    msgs, answer, _ = format_grpo_row("prompt-answer", {"prompt": "3+4=", "answer": "7"})
    assert msgs == [{"role": "user", "content": "3+4="}] and answer == "7"
    assert format_grpo_row("prompt-answer", {"prompt": "Write f.", "tests": "assert f()"})[1] is None  # code tasks
    with pytest.raises(BadRow, match="####"):
        format_grpo_row("gsm8k", {"question": "q", "answer": "no marker"})


@pytest.mark.parametrize("row, problem", [
    ({"problem": None, "generated_solution": "s", "expected_answer": "1"}, "'problem' is missing"),
    ({"problem": 3, "generated_solution": "s", "expected_answer": "1"}, "'problem' should be text"),
    ({"problem": "  ", "generated_solution": "s", "expected_answer": "1"}, "'problem' is empty"),
    ({"problem": "p", "generated_solution": "s", "expected_answer": ["1"]}, "text or a number"),
])
def test_bad_openmath_rows_say_what_is_wrong(row, problem):
    with pytest.raises(BadRow, match=problem):
        format_sft_row("openmath-reasoning", row)


def test_format_detection():
    assert detect_format(["problem", "generated_solution", "expected_answer", "x"], "sft") == "openmath-reasoning"
    assert detect_format(["messages"], "sft") == "chat"
    assert detect_format(["conversations"], "sft") == "chat"
    assert detect_format(["prompt", "completion"], "sft") == "prompt-completion"
    assert detect_format(["text", "meta"], "sft") == "text"
    assert detect_format(["question", "answer"], "grpo") == "gsm8k"
    assert detect_format(["prompt", "solution", "data_source"], "grpo") == "dapo-math"
    assert detect_format(["prompt", "answer"], "grpo") == "prompt-answer"
    assert detect_format(["prompt", "tests"], "grpo") == "prompt-answer"
    with pytest.raises(UserError, match=r"\(foo, bar\).*--format"):
        detect_format(["foo", "bar"], "grpo")


# ---------------------------------------------------------------------------------------- templates


def test_reasoning_template_puts_system_first_and_opens_the_working(tok):
    tok = AutoTokenizer.from_pretrained(tok.name_or_path)
    apply_chat_template(tok, "auto", data_format="dapo-math")
    prompt = render(tok, [{"role": "user", "content": "1+1?"}], add_generation_prompt=True)
    assert prompt == (f"<|im_start|>system\n{REASONING_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n"
                      "<|im_start|>assistant\n<start_working_out>")
    own = render(tok, [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}])
    assert own == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nu<|im_end|>\n"
    apply_chat_template(tok, "reasoning", 'Say "x"\nnow')
    assert render(tok, [{"role": "user", "content": "u"}]).startswith('<|im_start|>system\nSay "x"\nnow<|im_end|>')


def test_template_choices(tmp_path, tok, qwen_tokenizer):
    tiny = AutoTokenizer.from_pretrained(tok.name_or_path)
    assert apply_chat_template(tiny, "auto") == tok.chat_template  # not math: the model's own
    msgs = [{"role": "user", "content": "u"}]
    apply_chat_template(tiny, "chatml", "Sys")
    assert render(tiny, msgs, True) == "<|im_start|>system\nSys<|im_end|>\n<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\n"
    jinja = tmp_path / "t.jinja"
    jinja.write_text("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}")
    apply_chat_template(tiny, str(jinja))
    assert render(tiny, msgs) == "[user]u"
    with pytest.raises(UserError, match="no such file"):
        apply_chat_template(tiny, str(tmp_path / "missing.jinja"))
    with pytest.raises(UserError, match="auto, model, chatml, reasoning"):
        apply_chat_template(tiny, "llama9")
    tiny.chat_template = None
    with pytest.raises(UserError, match="has no chat template"):
        apply_chat_template(tiny, "model")
    assert apply_chat_template(tiny, "auto") == chatml_template()  # no template of its own: chatml
    qwen = render(qwen_tokenizer, msgs, chat_template=qwen_tokenizer.chat_template)
    assert qwen.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")


# ------------------------------------------------------------------------------------ assistant masks


@pytest.mark.parametrize("template", ["chatml", "reasoning"])
def test_masks_match_the_generation_markers(tok, template):
    tiny = AutoTokenizer.from_pretrained(tok.name_or_path)
    text = apply_chat_template(tiny, template)
    full, spans = assistant_char_spans(tiny, CONVERSATION, text)
    enc = tiny(full, add_special_tokens=False, return_offsets_mapping=True)
    ours = spans_to_mask(enc["offset_mapping"], spans)
    reference = tiny.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    assert enc["input_ids"] == reference["input_ids"]
    assert ours == reference["assistant_masks"]
    assert tiny.decode([i for i, m in zip(enc["input_ids"], ours) if m]) == "4<|im_end|>5, said the assistant<|im_end|>"


def test_masks_on_the_real_qwen_tokenizer(qwen_tokenizer):
    full, spans = assistant_char_spans(qwen_tokenizer, CONVERSATION[1:], qwen_tokenizer.chat_template)
    enc = qwen_tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = spans_to_mask(enc["offset_mapping"], spans)
    ids = enc["input_ids"]
    # Exactly the assistant contents and their closing <|im_end|>; every masked run is one turn.
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            runs.append(qwen_tokenizer.decode(current))
            current = []
    assert runs == ["4<|im_end|>", "5, said the assistant<|im_end|>"]
    # Qwen's default system turn and the "assistant" headers are not trained on.
    assert qwen_tokenizer.decode([i for i, m in zip(ids, mask) if not m]).startswith("<|im_start|>system\nYou are")


def test_sft_rows_train_on_the_assistant_turn_only(tiny_model_dir, tok, sft_file, tmp_path):
    prepared = prepare_sft_dataset(sft_cfg(tiny_model_dir, sft_file, tmp_path / "c"), tok, 1)
    rows = prepared.load_all()
    source = [json.loads(line) for line in sft_file.read_text().splitlines()]
    expected = {f"<start_working_out>{r['generated_solution']}<end_working_out><SOLUTION>{r['expected_answer']}"
                f"</SOLUTION><|im_end|>" for r in source}
    for row in rows:
        assert masked_text(tok, row) in expected
        text = tok.decode(row["input_ids"])
        assert text.startswith(f"<|im_start|>system\n{REASONING_SYSTEM_PROMPT}")
    assert prepared.stats.sft.assistant_tokens == sum(sum(r["assistant_masks"]) for r in rows)
    assert "<start_working_out>" in prepared.chat_template
    assert prepared.meta["format"] == "openmath-reasoning"  # detected


def test_qwen_prepared_rows(qwen_tokenizer_dir, tmp_path):
    data = write_rows([{"messages": CONVERSATION[1:3]}] * 3, tmp_path / "chat.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    prepared = prepare_sft_dataset(sft_cfg(qwen_tokenizer_dir, data, tmp_path / "c"), tokenizer, 1)
    assert prepared.meta["format"] == "chat"
    assert masked_text(tokenizer, prepared.load_all()[0]) == "4<|im_end|>"


def test_text_format_trains_on_every_token(tiny_model_dir, tok, tmp_path):
    data = write_rows([{"text": "abc"}, {"text": "de"}], tmp_path / "t.jsonl")
    rows = prepare_sft_dataset(sft_cfg(tiny_model_dir, data, tmp_path / "c", seed=0), tok, 1).load_all()
    for row in rows:
        assert row["input_ids"][-1] == tok.eos_token_id and all(row["assistant_masks"])
    assert sorted(tok.decode(r["input_ids"]) for r in rows) == ["abc<|im_end|>", "de<|im_end|>"]


def test_without_assistant_only_loss_every_token_counts(tiny_model_dir, tok, sft_file, tmp_path):
    rows = prepare_sft_dataset(sft_cfg(tiny_model_dir, sft_file, tmp_path / "c", assistant_only_loss=False),
                               tok, 1).load_all()
    assert all(all(r["assistant_masks"]) for r in rows)
    assert tok.decode(rows[0]["input_ids"]).startswith("<|im_start|>system\n")


def test_truncation_is_counted(tiny_model_dir, tok, tmp_path):
    long = "x" * 60
    data = write_rows([{"prompt": "q", "completion": long}, {"prompt": "q", "completion": "y"},
                       {"prompt": "q" * 200, "completion": "z"}], tmp_path / "pc.jsonl")
    prepared = prepare_sft_dataset(sft_cfg(tiny_model_dir, data, tmp_path / "c", max_seq_length=40,
                                           chat_template="chatml"), tok, 1)
    s = prepared.stats
    assert s.sft.truncated_rows == 2  # the long completion and the long prompt
    assert s.sft.dropped_no_assistant_tokens == 1  # the long prompt: its answer was cut off entirely
    assert s.num_rows == 2 and s.sft.longest_row_tokens > 200
    assert all(len(r["input_ids"]) <= 40 for r in prepared.load_all())


def test_stats_read_back_every_key_of_this_and_older_metadata():
    from opensloth.data import PrepStats, describe_drops

    # As a GRPO entry of this version writes them (no eval prompts, so no dropped_long_eval_prompts).
    grpo = {"rows_in": 10, "format": "prompt-answer", "num_rows": 7, "eval_rows": 1, "chat_template": "model",
            "seconds": 0.5, "bad_rows": 2, "bad_row_examples": ["row 3: column 'prompt' is empty"],
            "prompt_rendering": "text prompts as they are", "prompt_tokens_p50": 5, "prompt_tokens_p90": 9,
            "prompt_tokens_p99": 9, "prompt_tokens_max": 9, "max_prompt_length": 8, "prompt_length_percentile": None,
            "percentile_tokens": None, "prompt_length_threshold": 8, "dropped_long_prompts": 1,
            "dropped_over_max_prompt_length": 1, "dropped_over_percentile": 0}
    stats = PrepStats.from_dict(grpo)
    assert stats.to_dict() == grpo and stats.sft is None and stats.prompts.prompt_length_threshold == 8
    assert describe_drops(stats) == ["2 malformed rows dropped (--skip-bad-rows)",
                                     "1 prompt longer than --max-prompt-length 8 dropped"]
    # An older SFT entry: no bad-row count yet, and a key this version does not know (kept as it is).
    old = {"rows_in": 4, "num_rows": 3, "max_seq_length": 16, "truncated_rows": 1, "tokens": 40,
           "assistant_tokens": 9, "longest_row_tokens": 20, "dropped_no_assistant_tokens": 1, "packing": False}
    stats = PrepStats.from_dict(old)
    assert stats.other == {"packing": False} and stats.sft.truncated_rows == 1
    assert stats.to_dict() == {**old, "bad_rows": 0}
    assert describe_drops(stats) == ["1 row truncated to --max-seq-length 16",
                                     "1 row dropped: no assistant tokens left after truncation"]
    assert describe_drops(PrepStats.from_dict({})) == [] and PrepStats.from_dict({}).rows_in is None


# -------------------------------------------------------------------------------------------- cache


def test_cache_hit_miss_invalidation_and_overwrite(tiny_model_dir, tok, sft_file, tmp_path, qwen_tokenizer):
    cache = tmp_path / "cache"
    base = {"num_samples": 20, "seed": 1}
    assert find_cached(sft_cfg(tiny_model_dir, sft_file, cache, **base), tok) is None
    first = prepare_sft_dataset(sft_cfg(tiny_model_dir, sft_file, cache, **base), tok, 1)
    assert find_cached(sft_cfg(tiny_model_dir, sft_file, cache, **base), tok).path == first.path
    tok(["a", "bb"], padding=True, truncation=True, max_length=2)  # changes the saved padding state, not the ids
    again = prepare_sft_dataset(sft_cfg(tiny_model_dir, sft_file, cache, **base), tok, 1)
    assert not first.cache_hit and again.cache_hit and again.path == first.path
    assert again.fingerprint == first.fingerprint
    changes = {"format": "openmath-reasoning", "chat_template": "chatml", "system_prompt": "S", "max_seq_length": 130,
               "num_samples": 10, "seed": 2, "skip_bad_rows": True, "eval_split_ratio": 0.2,
               "assistant_only_loss": False}
    seen = {first.fingerprint}
    for key, value in changes.items():
        other = prepare_sft_dataset(sft_cfg(tiny_model_dir, sft_file, cache, **{**base, key: value}), tok, 1)
        assert not other.cache_hit and other.fingerprint not in seen, key
        seen.add(other.fingerprint)
    grpo_rows = write_rows(make_arithmetic_rows(5, 0, "prompt-answer"), tmp_path / "pa.jsonl")
    g1 = prepare_grpo_dataset(grpo_cfg(tiny_model_dir, grpo_rows, cache), tok, 1)
    assert g1.fingerprint not in seen
    other_tok = prepare_sft_dataset(sft_cfg(tiny_model_dir, sft_file, cache, **base), qwen_tokenizer, 1)
    assert not other_tok.cache_hit and other_tok.fingerprint not in seen
    # Changing the file's contents (size and mtime) invalidates it.
    time.sleep(0.01)
    write_rows(make_arithmetic_rows(24, seed=9, schema="openmath"), sft_file)
    changed = prepare_sft_dataset(sft_cfg(tiny_model_dir, sft_file, cache, **base), tok, 1)
    assert not changed.cache_hit and changed.fingerprint != first.fingerprint
    # --overwrite-cache rebuilds the same entry.
    rebuilt = prepare_sft_dataset(sft_cfg(tiny_model_dir, sft_file, cache, **base, overwrite_cache=True), tok, 1)
    assert not rebuilt.cache_hit and rebuilt.path == changed.path and len(rebuilt.load_all()) == 20
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_an_interrupted_write_leaves_no_entry(tiny_model_dir, tok, sft_file, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    real_save = datasets.Dataset.save_to_disk

    def save_then_die(self, path, *args, **kwargs):
        real_save(self, path, *args, **kwargs)  # the rows are on disk, the metadata is not yet
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare_sft_dataset(sft_cfg(tiny_model_dir, sft_file, cache), tok, 1)
    assert [p.name for p in cache.iterdir()] == ["hf-datasets"]  # nothing that looks prepared, no temp dir
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", real_save)
    assert not prepare_sft_dataset(sft_cfg(tiny_model_dir, sft_file, cache), tok, 1).cache_hit


def test_cache_dir_defaults_to_the_environment(tiny_model_dir, tok, sft_file, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENSLOTH_CACHE", str(tmp_path / "envcache"))
    cfg = resolve_config("sft", None, {"model": str(tiny_model_dir), "dataset": str(sft_file)})
    assert prepare_sft_dataset(cfg, tok, 1).path.parent == tmp_path / "envcache"


# ----------------------------------------------------------------------------------------- bad rows


def test_bad_row_stops_with_its_index_unless_skipped(tiny_model_dir, tok, tmp_path):
    rows = make_arithmetic_rows(6, 0, "openmath")
    rows[4]["problem"] = ""
    rows[2]["expected_answer"] = None
    data = write_rows(rows, tmp_path / "bad.jsonl")
    with pytest.raises(UserError, match=r"Row (3|5) of --dataset \S+bad.jsonl is malformed.*--skip-bad-rows"):
        prepare_sft_dataset(sft_cfg(tiny_model_dir, data, tmp_path / "c"), tok, 1)
    prepared = prepare_sft_dataset(sft_cfg(tiny_model_dir, data, tmp_path / "c", skip_bad_rows=True), tok, 1)
    assert prepared.num_rows == 4 and prepared.stats.bad_rows == 2
    assert any(e.startswith("row 5: column 'problem' is empty") for e in prepared.stats.bad_row_examples)


def test_chatml_on_a_tokenizer_without_im_end_warns(tiny_model_dir, tmp_path, caplog):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from opensloth.models.tiny import _bytes_to_unicode

    backend = Tokenizer(models.BPE(vocab={c: b for b, c in _bytes_to_unicode().items()}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    foreign = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|eot|>")
    data = write_rows([{"prompt": "q", "answer": "1"}], tmp_path / "pa.jsonl")
    with caplog.at_level("WARNING", logger="opensloth"):
        prepare_grpo_dataset(grpo_cfg(tiny_model_dir, data, tmp_path / "c", chat_template="chatml"), foreign, 1)
    assert "not a token of" in caplog.text and "--chat-template model" in caplog.text


def test_wrong_format_names_the_missing_columns(tiny_model_dir, tok, sft_file, tmp_path):
    with pytest.raises(UserError, match="--format chat needs the columns messages.*problem, generated_solution"):
        prepare_sft_dataset(sft_cfg(tiny_model_dir, sft_file, tmp_path / "c", format="chat"), tok, 1)


# ------------------------------------------------------------------------------------------- shards


def test_shards_are_disjoint_complete_and_follow_the_batch_rule(tiny_model_dir, tok, sft_file, tmp_path):
    cfg = sft_cfg(tiny_model_dir, sft_file, tmp_path / "c")
    one = prepare_sft_dataset(cfg, tok, 1)
    ids = [tuple(x) for x in one.load_all()["input_ids"]]
    for world in (2, 3):
        prepared = prepare_sft_dataset(cfg, tok, world)
        assert prepared.cache_hit and prepared.num_shards == world and prepared.path == one.path
        shards = [[tuple(x) for x in prepared.load_shard(r)["input_ids"]] for r in range(world)]
        union = [row for shard in shards for row in shard]
        assert sorted(union) == sorted(ids)  # disjoint and complete
        for b in (1, 2, 4):
            for k in range(len(ids) // (world * b)):
                local = [row for shard in shards for row in shard[k * b:(k + 1) * b]]
                assert sorted(local) == sorted(ids[k * world * b:(k + 1) * world * b]), (world, b, k)
        assert [tuple(x) for x in prepared.load_all()["input_ids"]] == ids
    last = load_prepared(one.path).meta["reshard_history"][-1]
    assert (last["from"], last["to"]) == (2, 3)  # re-sharding is recorded
    with pytest.raises(ValueError):
        load_prepared(one.path).load_shard(3)


def test_prepared_dir_as_dataset_and_check_shards(tiny_model_dir, tok, sft_file, tmp_path, qwen_tokenizer):
    import shutil

    prepared = prepare_sft_dataset(sft_cfg(tiny_model_dir, sft_file, tmp_path / "c"), tok, 2)
    copy = tmp_path / "mine"
    shutil.copytree(prepared.path, copy)
    reused = prepare_sft_dataset(sft_cfg(tiny_model_dir, copy, tmp_path / "c2"), tok, 2)
    assert reused.cache_hit and reused.path == copy and reused.num_rows == prepared.num_rows
    assert not (tmp_path / "c2").exists()  # nothing prepared
    with pytest.raises(UserError, match=r"prepared for 2 workers but this run has 1.*--num-workers 1.*cpu:2"):
        prepare_sft_dataset(sft_cfg(tiny_model_dir, copy, tmp_path / "c2"), tok, 1)
    with pytest.raises(UserError, match="different tokenizer"):
        prepare_sft_dataset(sft_cfg(tiny_model_dir, copy, tmp_path / "c2"), qwen_tokenizer, 2)
    with pytest.raises(UserError, match="prepared for `os-train sft`"):
        prepare_grpo_dataset(grpo_cfg(tiny_model_dir, copy, tmp_path / "c2"), tok, 2)
    check_shards(reused, 2)
    assert reshard(reused, 1).num_shards == 1 and load_prepared(copy).num_shards == 1


# --------------------------------------------------------------------------------------- file kinds


@pytest.mark.parametrize("kind", ["json", "jsonl", "csv", "parquet", "saved", "saved_dict"])
def test_local_file_kinds(tiny_model_dir, tok, tmp_path, kind):
    rows = make_arithmetic_rows(6, 0, "dapo")
    ds = datasets.Dataset.from_list(rows)
    path = tmp_path / f"rows.{kind}"
    if kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "jsonl":
        write_rows(rows, path)
    elif kind == "csv":
        ds.to_csv(str(path))
    elif kind == "parquet":
        ds.to_parquet(str(path))
    elif kind == "saved":
        ds.save_to_disk(str(path))
    else:
        datasets.DatasetDict({"test": ds}).save_to_disk(str(path))
    over = {"dataset_split": "test"} if kind == "saved_dict" else {}
    prepared = prepare_grpo_dataset(grpo_cfg(tiny_model_dir, path, tmp_path / "c", prompt_length_percentile=1.0,
                                             **over), tok, 1)
    assert prepared.meta["format"] == "dapo-math" and prepared.num_rows == 6
    assert sorted(prepared.load_all()["answer"]) == sorted(r["solution"] for r in rows)


def test_source_errors(tiny_model_dir, tok, tmp_path):
    cfg = lambda ds, **o: sft_cfg(tiny_model_dir, ds, tmp_path / "c", **o)
    with pytest.raises(UserError, match="no such file"):
        prepare_sft_dataset(cfg(tmp_path / "missing.jsonl"), tok, 1)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="empty.jsonl: the file is empty"):
        prepare_sft_dataset(cfg(tmp_path / "empty.jsonl"), tok, 1)
    (tmp_path / "cols.jsonl").write_text('{"question": "1+1", "solution": "2"}\n')
    with pytest.raises(UserError, match=r"--dataset \S+cols.jsonl: cannot tell the row format.*question, solution"):
        prepare_grpo_dataset(grpo_cfg(tiny_model_dir, tmp_path / "cols.jsonl", tmp_path / "c"), tok, 1)
    (tmp_path / "rows.txt").write_text("hello")
    with pytest.raises(UserError, match="unsupported file type '.txt'"):
        prepare_sft_dataset(cfg(tmp_path / "rows.txt"), tok, 1)
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(UserError, match=r"broken.jsonl, line 2: not valid JSON"):
        prepare_sft_dataset(cfg(tmp_path / "broken.jsonl"), tok, 1)
    datasets.DatasetDict({"cot": datasets.Dataset.from_list([{"text": "a"}])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(UserError, match="--dataset-split 'train' is not in .*splits are: cot"):
        prepare_sft_dataset(cfg(tmp_path / "dd"), tok, 1)


def test_hub_dataset_offline_is_a_clear_error(tiny_model_dir, tok, tmp_path, monkeypatch):
    import huggingface_hub.constants

    # Offline mode makes the hub lookup fail at once, as it does (after retries) without a network.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"--dataset nobody/no-such-dataset: the dataset could not be downloaded"
                                        r".*local \.json/\.jsonl"):
        prepare_sft_dataset(sft_cfg(tiny_model_dir, "nobody/no-such-dataset", tmp_path / "c"), tok, 1)


# ------------------------------------------------------------------------------------------- GRPO


def test_grpo_rows_and_passthrough_columns(tiny_model_dir, tok, tmp_path):
    rows = [{**r, "data_source": f"src{i}", "level": i} for i, r in enumerate(make_arithmetic_rows(8, 0, "dapo"))]
    data = write_rows(rows, tmp_path / "dapo.jsonl")
    prepared = prepare_grpo_dataset(grpo_cfg(tiny_model_dir, data, tmp_path / "c", prompt_length_percentile=1.0),
                                    tok, 1)
    out = prepared.load_all()
    assert {"prompt", "prompt_text", "prompt_ids", "answer", "solution", "data_source", "level"} <= set(out.column_names)
    by_source = {r["data_source"]: r for r in rows}
    for row in out:
        src = by_source[row["data_source"]]
        assert row["answer"] == src["solution"] and row["level"] == src["level"]
        assert row["prompt"][-1] == {"role": "user", "content": src["prompt"]}
        assert row["prompt_text"].endswith("<|im_start|>assistant\n<start_working_out>")
        assert row["prompt_ids"] == tok(row["prompt_text"], add_special_tokens=False)["input_ids"]


def test_code_prompts_without_answers_keep_their_tests(tiny_model_dir, tok, tmp_path):
    rows = [{"prompt": "Write add(a, b).", "tests": ["assert add(1, 2) == 3"]}, {"prompt": "Write f().", "tests": []}]
    data = write_rows(rows, tmp_path / "code.jsonl")
    out = prepare_grpo_dataset(grpo_cfg(tiny_model_dir, data, tmp_path / "c", prompt_length_percentile=1.0,
                                        seed=0), tok, 1).load_all()
    assert sorted(map(len, out["tests"])) == [0, 1] and out["answer"] == [None, None]


def test_a_rewards_dataset_check_runs_at_data_prep_and_can_refuse(tiny_model_dir, tok, tmp_path, clean_registry):
    from opensloth.data.grpo_prompts import prompt_set
    from opensloth.rewards.base import RewardFunction, register_reward_function

    calls = []

    class NeedsTopic(RewardFunction):
        """A custom reward whose scores need a `topic` in every row: it refuses a dataset without one."""

        name = "needs_topic"

        def score(self, prompts, completions, **columns):
            return [0.0] * len(completions)

        def check_dataset(self, rows, where, row_name):
            calls.append((where, len(rows)))
            empty = [i for i, topic in enumerate(rows["topic"]) if not topic]
            if empty:
                raise UserError(f"{where}, {row_name(empty[0])}: needs_topic needs a topic")

    register_reward_function(NeedsTopic())
    rows = [{"prompt": "Say hi.", "answer": "hi", "topic": "greeting"}, {"prompt": "Say bye.", "answer": "bye", "topic": ""}]
    data = write_rows(rows, tmp_path / "topics.jsonl")
    with pytest.raises(UserError, match=r"^--dataset .*topics\.jsonl, row 2: needs_topic needs a topic$"):
        prepare_grpo_dataset(grpo_cfg(tiny_model_dir, data, tmp_path / "c", rewards=["needs_topic"]), tok, 1)
    with pytest.raises(UserError, match="row 2: needs_topic needs a topic"):
        prompt_set(DataConfig(dataset=str(data)), 0, ["needs_topic"])
    assert calls == [(f"--dataset {data}", 2)] * 2
    # A run without that reward never asks it; a dataset it accepts is prepared.
    assert prepare_grpo_dataset(grpo_cfg(tiny_model_dir, data, tmp_path / "c", rewards=["length_penalty"]), tok,
                                1).num_rows == 2 and len(calls) == 2
    good = write_rows([{**r, "topic": "t"} for r in rows], tmp_path / "good.jsonl")
    assert prepare_grpo_dataset(grpo_cfg(tiny_model_dir, good, tmp_path / "c", rewards=["needs_topic"]), tok,
                                1).num_rows == 2 and calls[-1] == (f"--dataset {good}", 2)


def test_code_correctness_refuses_unsplittable_tests_through_its_dataset_check(tiny_model_dir, tok, tmp_path):
    from opensloth.data.grpo_prompts import prompt_set

    rows = [{"prompt": "Write add(a, b).", "test_cases": ["assert add(1, 2) == 3"]},
            {"prompt": "Write mk(x).", "test_cases": ["assert mk(1) == Node(1)"]}]
    data = write_rows(rows, tmp_path / "code.jsonl")
    with pytest.raises(UserError, match=r"code\.jsonl, row 2, column 'test_cases': the test 'assert mk\(1\) == Node"):
        prepare_grpo_dataset(grpo_cfg(tiny_model_dir, data, tmp_path / "c", task="code"), tok, 1)
    with pytest.raises(UserError, match="row 2, column 'test_cases'"):
        prompt_set(DataConfig(dataset=str(data)), 0, ["code_correctness"])
    assert prepare_grpo_dataset(grpo_cfg(tiny_model_dir, data, tmp_path / "c"), tok, 1).num_rows == 2  # no such reward


def test_long_prompts_are_dropped_and_counted(tiny_model_dir, tok, tmp_path):
    rows = [{"prompt": "q" * n, "answer": "1"} for n in range(1, 11)]  # prompt lengths differ by 1 token each
    data = write_rows(rows, tmp_path / "pa.jsonl")
    prepared = prepare_grpo_dataset(grpo_cfg(tiny_model_dir, data, tmp_path / "c", prompt_length_percentile=0.8),
                                    tok, 1)
    prompts = prepared.stats.prompts
    assert prepared.num_rows == 8 and prompts.dropped_long_prompts == 2
    lengths = [len(x) for x in prepared.load_all()["prompt_ids"]]
    assert max(lengths) == prompts.prompt_length_threshold == prompts.prompt_tokens_max - 2
    shortest = min(lengths)
    capped = prepare_grpo_dataset(grpo_cfg(tiny_model_dir, data, tmp_path / "c", prompt_length_percentile=1.0,
                                           max_prompt_length=shortest + 2), tok, 1)
    assert capped.num_rows == 3 and capped.stats.prompts.dropped_long_prompts == 7
    with pytest.raises(UserError, match="--max-prompt-length"):
        prepare_grpo_dataset(grpo_cfg(tiny_model_dir, data, tmp_path / "c", max_prompt_length=shortest - 1), tok, 1)
    assert nearest_rank([5, 1, 3, 2, 4], 0.5) == 3 and nearest_rank([5, 1, 3, 2, 4], 1.0) == 5


def test_eval_split_and_eval_dataset(tiny_model_dir, tok, tmp_path):
    train = write_rows(make_arithmetic_rows(20, 0, "gsm8k"), tmp_path / "train.jsonl")
    held = write_rows(make_arithmetic_rows(5, 1, "gsm8k"), tmp_path / "held.jsonl")
    split = prepare_grpo_dataset(grpo_cfg(tiny_model_dir, train, tmp_path / "c", eval_split_ratio=0.25,
                                          prompt_length_percentile=1.0), tok, 2)
    assert split.num_rows == 15 and len(split.load_eval()) == 5
    given = prepare_grpo_dataset(grpo_cfg(tiny_model_dir, train, tmp_path / "c", eval_dataset=str(held),
                                          prompt_length_percentile=1.0), tok, 1)
    assert given.num_rows == 20 and sorted(given.load_eval()["answer"]) == sorted(
        r["answer"].split("#### ")[1] for r in make_arithmetic_rows(5, 1, "gsm8k"))
    assert prepare_grpo_dataset(grpo_cfg(tiny_model_dir, train, tmp_path / "c", prompt_length_percentile=1.0),
                                tok, 1).load_eval() is None


def test_num_samples_selects_seeded_rows(tiny_model_dir, tok, tmp_path):
    data = write_rows(make_arithmetic_rows(30, 0, "prompt-answer"), tmp_path / "pa.jsonl")
    pick = lambda seed: prepare_grpo_dataset(grpo_cfg(tiny_model_dir, data, tmp_path / "c",
                                                      num_samples=7, seed=seed, prompt_length_percentile=1.0),
                                             tok, 1).load_all()["prompt_text"]
    assert len(pick(1)) == 7 and pick(1) == pick(1) and pick(1) != pick(2)


# ------------------------------------------------------------------------------------------- TRL


def test_trl_sft_trainer_labels_exactly_the_assistant_tokens(tiny_model_dir, tok, sft_file, tmp_path):
    """TRL 1.15's SFTTrainer, given our pre-tokenized rows, builds labels from `assistant_masks`."""
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    rows = prepare_sft_dataset(sft_cfg(tiny_model_dir, sft_file, tmp_path / "c", num_samples=4), tok, 1).load_all()
    args = SFTConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, max_length=512,
                     assistant_only_loss=False, dataset_num_proc=None)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args,
                         train_dataset=rows, processing_class=tok)
    prepared = trainer.train_dataset
    assert len(prepared) == len(rows)
    for ours, theirs in zip(rows, prepared):
        assert theirs["input_ids"] == ours["input_ids"]
        assert theirs["labels"] == [i if m else -100 for i, m in zip(ours["input_ids"], ours["assistant_masks"])]


# Qwen3's switch, as its template writes it: an empty think block when enable_thinking is false.
QWEN3_STYLE = (r"{%- for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endfor %}"
               r"{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
               r"{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}"
               r"{%- endif %}{%- endif %}")


def test_chat_template_kwargs_reach_the_prompts_the_cache_key_and_the_saved_template(tiny_model_dir, tok, tmp_path):
    """Issue 20: TRL's chat_template_kwargs (Qwen3's enable_thinking) is set in the template itself, so the
    prompts, a saved model's template (eval, generate, export) and the cache key all carry it."""
    template = tmp_path / "qwen3ish.jinja"
    template.write_text(QWEN3_STYLE)
    data = write_rows([{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(4)], tmp_path / "add.jsonl")
    plain = prepare_grpo_dataset(grpo_cfg(tiny_model_dir, data, tmp_path / "c", chat_template=str(template)), tok, 1)
    off = prepare_grpo_dataset(grpo_cfg(tiny_model_dir, data, tmp_path / "c", chat_template=str(template),
                                        chat_template_kwargs={"enable_thinking": False}), tok, 1)
    assert plain.fingerprint != off.fingerprint and not off.cache_hit
    assert all(not t.endswith("</think>\n\n") for t in plain.load_all()["prompt_text"])
    assert all(t.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") for t in off.load_all()["prompt_text"])
    # What the recipes save with the model: rendering with it later gives the same prompt, no kwargs needed.
    saved = off.chat_template
    assert saved.startswith("{%- set enable_thinking = false %}")
    rendered = render(tok, [{"role": "user", "content": "0+0="}], add_generation_prompt=True, chat_template=saved)
    assert rendered in off.load_all()["prompt_text"]
    # Text prompts otherwise go raw, as TRL's do; asking for template variables asks for the template.
    auto = prepare_grpo_dataset(grpo_cfg(tiny_model_dir, data, tmp_path / "c",
                                         chat_template_kwargs={"enable_thinking": False}), tok, 1)
    assert "--chat-template-kwargs" in auto.stats.prompt_rendering
    assert all(t.startswith("<|im_start|>") for t in auto.load_all()["prompt_text"])


def test_chat_template_kwargs_on_the_command_line_are_json(tmp_path):
    from opensloth.config import overrides_from_cli

    assert overrides_from_cli("grpo", {"chat_template_kwargs": '{"enable_thinking": false}'}) == {
        "chat_template_kwargs": {"enable_thinking": False}}
    with pytest.raises(UserError, match="not a JSON object"):
        overrides_from_cli("grpo", {"chat_template_kwargs": "enable_thinking=false"})
    with pytest.raises(UserError, match="must be identifiers"):
        resolve_config("grpo", None, {"model": "m", "chat_template_kwargs": {"not valid": 1}})

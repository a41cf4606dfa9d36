"""Data: sources, row formats, chat templates, tokenization with assistant masks, cache, shards.

Where each thing lives:
    sources.py       load a hub name, a local file or a saved directory; name a row in messages
    formats.py       one source row -> a conversation (SFT) or a prompt and its answer (GRPO)
    templates.py     the chat templates (chatml, reasoning, r1-zero, the model's own) and rendering
    rows.py          what SFT and GRPO share: format detection, seeded order, bad rows, eval split
    sft_rows.py      SFT: tokenization with assistant masks
    grpo_prompts.py  GRPO: prompts rendered as the model gets them, the prompt-length filter, rewards'
                     dataset checks; `prompt_set` (no tokenizer)
    stats.py         PrepStats: what prep read, kept and dropped; describe_drops
    prepared.py      the prepared directory on disk: PreparedDataset, re-sharding, the sharding rule
    cache.py         the cache root, the fingerprint, cache lookup
    prepare.py       prepare_sft_dataset / prepare_grpo_dataset: the steps above, in order

Public API:

    prepare_sft_dataset(cfg, tokenizer, num_shards) -> PreparedDataset
    prepare_grpo_dataset(cfg, tokenizer, num_shards) -> PreparedDataset
    load_prepared(path) -> PreparedDataset      # .load_shard(rank), .load_all(), .load_eval(), .chat_template
    reshard(prepared, num_shards) -> PreparedDataset
    check_shards(prepared, num_workers)          # UserError when the counts differ
    find_cached(cfg, tokenizer) -> PreparedDataset | None   # cache lookup only (dry runs)
    cache_entry(cfg, tokenizer) -> Path          # where this config's prepared data is cached
    PrepStats                                    # PreparedDataset.stats; .to_dict() for every key
    describe_drops(stats) -> list[str]           # what prep dropped or clamped, for the plan
"""

from opensloth.data.cache import cache_entry, find_cached
from opensloth.data.prepare import prepare_grpo_dataset, prepare_sft_dataset
from opensloth.data.prepared import PreparedDataset, check_shards, load_prepared, reshard
from opensloth.data.stats import PrepStats, describe_drops

__all__ = [
    "PrepStats",
    "PreparedDataset",
    "cache_entry",
    "check_shards",
    "describe_drops",
    "find_cached",
    "load_prepared",
    "prepare_grpo_dataset",
    "prepare_sft_dataset",
    "reshard",
]

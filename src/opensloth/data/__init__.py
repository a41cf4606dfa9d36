"""Data: sources, row formats, chat templates, tokenization with assistant masks, cache, shards.

Public API (see `opensloth.data.prepare` for the cache and the sharding rule):

    prepare_sft_dataset(cfg, tokenizer, num_shards) -> PreparedDataset
    prepare_grpo_dataset(cfg, tokenizer, num_shards) -> PreparedDataset
    load_prepared(path) -> PreparedDataset      # .load_shard(rank), .load_all(), .load_eval(), .chat_template
    reshard(prepared, num_shards) -> PreparedDataset
    check_shards(prepared, num_workers)          # UserError when the counts differ
    find_cached(cfg, tokenizer) -> PreparedDataset | None   # cache lookup only (dry runs)
    cache_entry(cfg, tokenizer) -> Path          # where this config's prepared data is cached
    describe_drops(stats) -> list[str]           # what prep dropped or clamped, for the plan
"""

from opensloth.data.prepare import (
    PreparedDataset,
    cache_entry,
    check_shards,
    describe_drops,
    find_cached,
    load_prepared,
    prepare_grpo_dataset,
    prepare_sft_dataset,
    reshard,
)

__all__ = [
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

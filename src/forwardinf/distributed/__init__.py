"""Scoring past one process: training shards dealt to torchrun ranks, written to one score store."""
from forwardinf.core.autobatch import activation_bytes, auto_batch_size
from forwardinf.distributed.context import DistContext, init_distributed
from forwardinf.distributed.runner import (BlockScorer, EstimatorBlocks, FillStats, ScoreRun, check_shardable,
                                           fill_store, score_to_store, store_manifest)
from forwardinf.distributed.sharding import shard_dataset, shard_ranges, shards_of_rank

__all__ = ["BlockScorer", "DistContext", "EstimatorBlocks", "FillStats", "ScoreRun", "activation_bytes", "check_shardable",
           "auto_batch_size", "fill_store", "init_distributed", "score_to_store", "shard_dataset", "shard_ranges",
           "shards_of_rank", "store_manifest"]

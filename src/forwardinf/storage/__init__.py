"""Scores on disk: memory-mapped blocks with a manifest, resumable runs, streaming top-k."""
from forwardinf.storage.manifest import (StoreMismatchError, check_manifest, config_hash, config_of,
                                         fingerprint_data, fingerprint_module, make_manifest)
from forwardinf.storage.store import ScoreStore
from forwardinf.storage.topk import RunningTopK, StreamingTopK, TopK, concat_topk, read_topk_csv, write_topk

__all__ = ["RunningTopK", "ScoreStore", "StoreMismatchError", "StreamingTopK", "TopK", "concat_topk", "check_manifest", "config_hash", "config_of",
           "fingerprint_data", "fingerprint_module", "make_manifest", "read_topk_csv", "write_topk"]

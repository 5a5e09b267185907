"""Scores on disk: memory-mapped blocks with a manifest, resumable runs, streaming top-k."""
from forwardinf.storage.manifest import (StoreMismatchError, check_manifest, config_hash, config_of,
                                         fingerprint_data, fingerprint_module, make_manifest)
from forwardinf.storage.store import ScoreStore
from forwardinf.storage.topk import StreamingTopK, TopK, read_topk_csv, write_topk

__all__ = ["ScoreStore", "StoreMismatchError", "StreamingTopK", "TopK", "check_manifest", "config_hash", "config_of",
           "fingerprint_data", "fingerprint_module", "make_manifest", "read_topk_csv", "write_topk"]

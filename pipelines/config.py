"""The typed configuration that flows through every stage of a build."""

from __future__ import annotations

import hashlib
import json
from typing import Optional

from pydantic import BaseModel, Field, field_validator, model_validator

PACKAGED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class BuildConfig(BaseModel):
    """Everything a build needs; recorded in the run manifest so a run can be resumed or repeated."""

    inputs: list[str] = Field(description="Parquet/JSONL files or folders, local paths or fsspec URIs (s3://...).")
    output: str = Field("rayindex-data", description="Output folder: versions/<run-id>/ and CURRENT go there.")
    id_column: Optional[str] = Field(None, description="Column with unique document ids; row numbers when not given.")
    text_columns: list[str] = Field(default_factory=lambda: ["text"], description="Columns joined with ': ' into the text.")
    template: Optional[str] = Field(None, description='Text template such as "{title}: {body}"; overrides text_columns.')
    shards: Optional[int] = Field(None, ge=1, description="Number of shards; derived from shard_size when not given.")
    shard_size: int = Field(50_000, ge=1, description="Target documents per shard when --shards is not given.")
    model: str = Field(PACKAGED_MODEL, description="sentence-transformers model name or local path.")
    batch_size: int = Field(64, ge=1, description="Encoding batch size.")
    encoders: Optional[int] = Field(None, ge=1, description="Encoder actors; one per GPU or per CPU when not given.")
    index: Optional[str] = Field(None, description="FAISS index_factory string; chosen from corpus size when not given.")
    metric: str = Field("ip", description="'ip' (inner product on normalized vectors) or 'l2'.")
    max_index_bytes: Optional[int] = Field(None, ge=1, description="RAM budget of the index when --index is not given (picks code size, OPQ, HNSW coarse quantizer).")
    train_sample: Optional[int] = Field(None, ge=1, description="Training sample size; derived from the index when not given.")
    on_disk: Optional[bool] = Field(None, description="Merge into on-disk inverted lists; automatic when not given.")
    memory_budget_bytes: Optional[int] = Field(None, ge=1, description="Merge on disk past this size; half the RAM when not given.")
    target_recall: Optional[float] = Field(None, gt=0, le=1, description="Tune nprobe to reach this recall@10 before publishing.")
    seed: int = Field(1234, description="Seed of the training sample and k-means.")
    use_gpu: Optional[bool] = Field(None, description="Encode/train on GPU; automatic when the cluster has GPUs.")
    ray_address: Optional[str] = Field(None, description="Ray cluster address; RAY_ADDRESS or a new local Ray when not given.")
    s3_endpoint: Optional[str] = Field(None, description="Endpoint of an S3-compatible store (else AWS_ENDPOINT_URL, else AWS).")
    storage_retry_s: float = Field(300.0, gt=0, description="How long to retry an unavailable store (backoff) before failing.")

    @field_validator("metric")
    @classmethod
    def _metric_known(cls, value: str) -> str:
        if value not in ("ip", "l2"):
            raise ValueError("metric must be 'ip' or 'l2'")
        return value

    @model_validator(mode="after")
    def _text_given(self) -> "BuildConfig":
        if not self.template and not self.text_columns:
            raise ValueError("give at least one --text-column or a --template")
        if not self.inputs:
            raise ValueError("give at least one input path")
        return self

    def text_fields(self) -> list[str]:
        """The corpus columns the document text is made of."""
        if self.template:
            import string

            return [name for _, name, _, _ in string.Formatter().parse(self.template) if name]
        return list(self.text_columns)

    def fingerprint(self) -> str:
        """Hash of the settings that change the result (not where Ray runs), to resume only identical runs."""
        relevant = self.model_dump(exclude={"ray_address", "encoders", "use_gpu", "on_disk", "memory_budget_bytes", "s3_endpoint",
                                             "storage_retry_s"})
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def parse_bytes(text: str) -> int:
    """'8G', '512M', '1.5T' or a plain number of bytes -> bytes (binary units)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        if value and value[-1] in units:
            return int(float(value[:-1]) * units[value[-1]])
        return int(float(value))
    except ValueError:
        raise ValueError(f"{text!r} is not a size; use e.g. 8G, 512M or a number of bytes") from None

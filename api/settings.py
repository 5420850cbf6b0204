"""Service settings, read from ``DETECT_*`` environment variables (pydantic-settings).

Decisions: every limit has a safe default, so an unconfigured server is still defended. ``DETECT_MODELS`` is
JSON mapping a served model name to its detector family and weights (a registered name, see ``detect weights
list``, or a file), e.g. ``{"faster_rcnn": {"family": "faster_rcnn", "weights": "/weights/frcnn.safetensors"}}``.
Unset or empty, the server serves the bundled shapes models: each registered ``<family>_shapes`` entry under its
family name (``faster_rcnn``, ``sppnet``, ``rcnn``), ``faster_rcnn`` the default (see
:func:`api.service.configured_models`). An empty variable counts as unset, for every setting. List-valued
settings (``DETECT_CORS_ORIGINS``) are JSON lists. The API key, when set, is required in ``X-API-Key`` on ``/detect``,
``/models``, the docs (``/docs``, ``/redoc``, ``/openapi.json``) and ``/metrics``; ``DETECT_PUBLIC_DOCS`` and
``DETECT_PUBLIC_METRICS`` open the last two groups (a browser cannot send the header; a scraper may not). The
probes stay open for orchestrators. ``detect serve`` warns when it listens beyond loopback without a key
(``--insecure`` silences it). The key is compared as UTF-8
bytes: a client sends the UTF-8 encoding of ``DETECT_API_KEY`` as the header's bytes (HTTP headers carry bytes;
a key typed in another encoding, e.g. Latin-1, is refused).

Connection limits (:mod:`api.server`, applied by ``detect serve``): request headers larger than
``max_header_bytes`` answer 431, headers that take longer than ``header_timeout_s`` from the moment the
connection could send a request answer 408, a body that takes longer than ``body_timeout_s`` to arrive answers
408, and an idle keep-alive connection is closed after ``keep_alive_s``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from detect.io import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE


class ModelSpec(BaseModel):
    family: str = Field(description="detector family: faster_rcnn, rcnn or sppnet")
    weights: str = Field(description="registered weights name (`detect weights list`) or path of a weights file")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DETECT_", frozen=True, env_ignore_empty=True)

    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    backend: Literal["torch", "onnxruntime", "pt2", "aoti"] = Field(
        "torch", description="runtime of the models: torch, or onnxruntime (pip install 'detect[onnx]'; an .onnx "
        "weights file from `detect export`, other weights exported once into the cache), or pt2 / aoti (a .pt2 file "
        "from `detect export --format pt2|aoti`)"
    )
    models: dict[str, ModelSpec] = Field(default_factory=dict)
    default_model: str | None = Field(None, description="model used when a request names none (default: the first)")
    warmup: bool = True

    max_body_bytes: int = Field(32 * 1024 * 1024, gt=0)
    max_images_per_request: int = Field(16, gt=0, description="capped by queue_size (see image_limit)")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0)
    max_side: int = Field(DEFAULT_MAX_SIDE, gt=0)
    decode_budget_bytes: int = Field(
        384 * 1024 * 1024,
        gt=0,
        description="decoded images in flight across all requests (decoding's peak, estimated from the header, then "
        "the decoded arrays until their answer): an image that does not fit waits, at most decode_wait_s, then 503 "
        "(api/memory.py). The default decodes two 40 MP RGB PNGs at once",
    )
    decode_wait_s: float = Field(10.0, ge=0, description="how long an image waits for the decoding budget; then 503")
    decode_max_side: int = Field(
        2000, gt=0, description="long side images are decoded at (at least) for models that declare no input size (R-CNN)"
    )

    max_batch: int = Field(8, gt=0, description="images per forward pass")
    inference_workers: int = Field(1, ge=1, le=8, description="forward passes that may run at once (threads)")
    torch_threads: int | None = Field(
        None, gt=0, description="torch intra-op threads, set by the inference thread (default: torch's, one per core)"
    )
    request_workers: int | None = Field(
        None, gt=0, le=64, description="threads that decode images and build answers (default: one per core, at most 8)"
    )
    inference_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="niceness added to the inference threads (Linux), so the event loop wins the CPU under load "
        "(overload p99 of 503s 10 ms instead of 25-32 ms, same throughput: benchmarks/soak.py)",
    )
    max_wait_ms: float = Field(5.0, ge=0, description="how long the first image of a batch waits for company")
    queue_size: int = Field(64, gt=0, description="images waiting for inference before requests get 503")
    request_timeout_s: float = Field(30.0, gt=0, description="decoding, queueing, inference and the answer")
    retry_after_s: int = Field(1, ge=0)

    max_header_bytes: int = Field(32 * 1024, ge=1024, description="request line and headers; above: 431")
    header_timeout_s: float = Field(10.0, gt=0, description="for the request line and headers to arrive; then 408")
    body_timeout_s: float = Field(60.0, gt=0, description="for the whole request body to arrive; then 408")
    keep_alive_s: float = Field(5.0, gt=0, description="an idle keep-alive connection is closed after this")

    url_inputs: bool = Field(
        False, description='accept JSON {"url": "https://..."} bodies: the server fetches the image (off by default)'
    )
    url_allow_private: bool = Field(
        False, description="let url inputs reach loopback, private and link-local addresses (refused by default)"
    )
    url_timeout_s: float = Field(10.0, gt=0, description="the most seconds fetching one url input may take")

    cors_origins: list[str] = Field(default_factory=list)
    api_key: SecretStr | None = None
    public_docs: bool = Field(False, description="/docs, /redoc and /openapi.json without the API key")
    public_metrics: bool = Field(False, description="/metrics without the API key (for a scraper that cannot send it)")

    @property
    def image_limit(self) -> int:
        """The most images one request may carry: ``max_images_per_request``, but never more than the queue holds
        (a request that can never fit is 413 ``too_many_images``, not 503 ``overloaded``)."""
        return min(self.max_images_per_request, self.queue_size)

"""Request and response models of the API (they are what ``/docs`` shows)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from detect.inference import DEFAULT_SCORE_THRESHOLD

ProposalMethod = Literal["selective_search", "rpn"]


class ErrorBody(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. corrupt_image")
    message: str


class ErrorResponse(BaseModel):
    """The one error shape of every endpoint and status."""

    error: ErrorBody


class DetectParams(BaseModel):
    """Detection parameters: JSON fields, or form fields next to the files of a multipart request.

    Thresholds can only tighten the model's own (see :class:`detect.inference.Refinement`). Their bounds are those
    of :func:`detect.inference.check_thresholds`, which ``detect predict`` applies: ``0 <= score_threshold <= 1``,
    ``0 < iou_threshold <= 1``, NaN and infinities refused (a test holds the two front ends to the same table)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="a name from GET /models; the server's default when omitted")
    score_threshold: float | None = Field(
        DEFAULT_SCORE_THRESHOLD,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="keep detections scoring at least this (omitted: 0.25; 0: everything the model keeps)",
    )
    iou_threshold: float | None = Field(
        None, gt=0.0, le=1.0, allow_inf_nan=False, description="per-class NMS; stricter than the model's only"
    )
    max_detections: int | None = Field(None, ge=1, le=1000)
    classes: list[str] | None = Field(
        None, min_length=1, description="class names or 1-based ids to keep; omit to keep all (an empty list is refused)"
    )
    proposals: ProposalMethod | None = Field(None, description="proposal method, among those the model supports")
    annotate: bool = Field(False, description="also return the image with boxes drawn, as base64 PNG")
    slice: int | None = Field(
        None, ge=32, le=4096, description="sliced inference: detect in overlapping tiles of this side (pixels) and "
        "merge the boxes back (large images with small objects); omit for one pass over the whole image"
    )
    overlap: float | None = Field(
        None, ge=0.0, lt=1.0, allow_inf_nan=False, description="overlap of neighbouring tiles (default 0.2); ignored without slice"
    )

    @field_validator("score_threshold", "iou_threshold", "max_detections", "slice", "overlap", mode="before")
    @classmethod
    def _numbers_not_booleans(cls, value: object) -> object:
        """JSON ``true`` is no threshold: pydantic's lax mode would take it as 1 (the schema says a number)."""
        if isinstance(value, bool):
            raise ValueError("must be a number, not true or false")
        return value


class ImageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str = Field(
        description="the image file's bytes, base64 (standard alphabet, padding optional)",
        json_schema_extra={"format": "byte", "contentEncoding": "base64"},
    )
    id: str | None = Field(None, max_length=200, description="echoed in the response")


class DetectJSONRequest(DetectParams):
    images: list[ImageIn] = Field(min_length=1)


class Detection(BaseModel):
    box: list[float] = Field(min_length=4, max_length=4, description="x1, y1, x2, y2 in pixels")
    score: float
    class_id: int = Field(description="1-based index into the model's class list")
    class_name: str


class ImageResult(BaseModel):
    """One input image: its detections, or ``error`` when only this image failed."""

    id: str | None = Field(None, description="the request's id (JSON) or file name (multipart)")
    width: int | None = None
    height: int | None = None
    detections: list[Detection] = Field(default_factory=list)
    timings_ms: dict[str, float] = Field(
        default_factory=dict, description="decode, queue, inference (or the detector's own stages), postprocess"
    )
    batch_size: int | None = Field(None, description="images that shared this image's forward pass")
    annotated_png: str | None = Field(None, description="base64 PNG, when annotate was requested")
    error: ErrorBody | None = None


class ModelRef(BaseModel):
    name: str
    version: str


class DetectResponse(BaseModel):
    model: ModelRef
    parameters: DetectParams
    images: list[ImageResult]


class ModelInfo(BaseModel):
    name: str
    detector: str = Field(description="the detector's own name, e.g. fasterrcnn_resnet50_fpn")
    version: str
    class_names: list[str]
    proposals: list[ProposalMethod]
    device: str


class ModelsResponse(BaseModel):
    default: str | None
    models: list[ModelInfo]


class Health(BaseModel):
    status: str

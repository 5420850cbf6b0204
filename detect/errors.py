"""One exception hierarchy for the whole project.

Every error a user can cause carries a stable machine-readable ``code`` (never renamed once published), an
HTTP status the API answers with, and the CLI exit code. The API turns any :class:`DetectError` into
``{"error": {"code": ..., "message": ...}}``; the CLI prints ``error[code]: message`` on stderr.
"""

from __future__ import annotations


class DetectError(Exception):
    """Base class: a problem with the caller's input or set-up, never a bug of ours."""

    code: str = "detect_error"
    http_status: int = 400
    exit_code: int = 1

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}

    def __str__(self) -> str:  # pragma: no cover - trivial
        return f"[{self.code}] {self.message}"


# --- image input -------------------------------------------------------------------------------------------
class ImageError(DetectError):
    """Something is wrong with one input image. Only that image fails."""

    code = "image_error"
    http_status = 422


class EmptyImageError(ImageError):
    code = "empty_input"
    http_status = 422


class UnsupportedFormatError(ImageError):
    """The bytes are not an image in a format we decode (sniffed from content, not the file name)."""

    code = "unsupported_format"
    http_status = 415


class ImageDecodeError(ImageError):
    """The bytes claim to be an image but are truncated or corrupt."""

    code = "corrupt_image"
    http_status = 422


class ImageTooLargeError(ImageError):
    """Pixel count above the configured limit (checked from the header, before decoding)."""

    code = "image_too_large"
    http_status = 413


class ImageDimensionsError(ImageError):
    """Absurd dimensions: zero, negative, or an aspect ratio no camera produces."""

    code = "bad_dimensions"
    http_status = 422


class UnreadableFileError(ImageError):
    """An image path that does not exist, is not a regular file, or cannot be opened for reading."""

    code = "unreadable_file"
    http_status = 422


class UnsupportedInputError(ImageError):
    """A Python object given as an image that is none of the kinds :class:`detect.Detector` takes (a path, bytes,
    a PIL image, an ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` ``uint8`` array, or a list of those)."""

    code = "unsupported_input"
    http_status = 422


class InputTooLargeError(ImageError):
    """An input's bytes (a URL's body, stdin) above the byte cap."""

    code = "input_too_large"
    http_status = 413


# --- inputs that are not files (detect.sources): URLs, videos, streams, cameras --------------------------------
class UrlRefusedError(ImageError):
    """A URL the guards refuse: not http(s), or resolving to a loopback, private or link-local address."""

    code = "url_refused"
    http_status = 422


class UrlFetchError(ImageError):
    """A URL that cannot be fetched: no such host, connection refused, an HTTP error status, too many redirects."""

    code = "url_unreachable"
    http_status = 422


class UrlTimeoutError(UrlFetchError):
    """A URL whose connection, a read, or the whole fetch took longer than its limit."""

    code = "url_timeout"


class UnreadableVideoError(ImageError):
    """A video file, stream or camera that cannot be opened."""

    code = "unreadable_video"
    http_status = 422


class FrameDecodeError(ImageError):
    """A frame of a video file that cannot be decoded (``details["frame"]`` is its index)."""

    code = "corrupt_frame"
    http_status = 422


class StreamDroppedError(ImageError):
    """A stream or camera that stopped delivering frames (``details["frame"]`` is the first one missing)."""

    code = "stream_dropped"
    http_status = 422


# --- models and weights ------------------------------------------------------------------------------------
class WeightsError(DetectError):
    """A weights file is missing, fails its checksum, or does not match the architecture."""

    code = "weights_error"
    http_status = 503
    exit_code = 2


class ConfigError(DetectError):
    """A configuration or recipe value is invalid."""

    code = "config_error"
    http_status = 422
    exit_code = 2


class WeightsNotFoundError(WeightsError):
    """A weights path that names no file."""

    code = "weights_not_found"
class ExportError(DetectError):
    """A detector the exporter cannot write (a model or configuration it does not handle), or an export that
    failed; nothing is left at the output path."""

    code = "export_unsupported"
    http_status = 422
    exit_code = 2


class OpsetError(ConfigError):
    """An ONNX opset the installed ``onnx`` package (or the exporter) cannot write."""

    code = "unsupported_opset"


class ExportVersionError(WeightsError):
    """An exported file (``.onnx``, ``.pt2``) written by another version of the export format."""

    code = "export_format_version"


class ChecksumError(WeightsError):
    """A weights file's SHA-256 differs from the one its manifest (or its download name) promises."""

    code = "weights_checksum"


class NoNetworkError(WeightsError):
    """A download could not reach its server (no network, DNS failure, refused connection or timeout)."""

    code = "no_network"


class OutputError(DetectError):
    """An output folder that cannot be written: an existing file, a read-only folder or mount, no permission."""

    code = "unwritable_output"
    http_status = 500
    exit_code = 2


class UnknownModelError(DetectError):
    code = "unknown_model"
    http_status = 404
    exit_code = 2


class UnknownClassError(DetectError):
    code = "unknown_class"
    http_status = 422
    exit_code = 2


# --- running a model -------------------------------------------------------------------------------------
class InferenceError(DetectError):
    """The detector raised on one image (after its batch was retried image by image)."""

    code = "inference_error"
    http_status = 500


class ProposalError(DetectError):
    """Selective search failed on one image (in a worker process)."""

    code = "proposal_error"
    http_status = 500


class UnsupportedProposalsError(DetectError):
    """A request names a proposal method the model does not have."""

    code = "unsupported_proposals"
    http_status = 422


# --- the service -------------------------------------------------------------------------------------------
class ServiceBusyError(DetectError):
    """The queue cannot take the request's images now; retry later (503 with ``Retry-After``)."""

    code = "overloaded"
    http_status = 503


class NotReadyError(DetectError):
    """Models are still loading or failed to load."""

    code = "not_ready"
    http_status = 503


class RequestTimeoutError(DetectError):
    code = "timeout"
    http_status = 504


class PayloadTooLargeError(DetectError):
    code = "payload_too_large"
    http_status = 413


class TooManyImagesError(DetectError):
    code = "too_many_images"
    http_status = 413


class BadBase64Error(ImageError):
    code = "bad_base64"
    http_status = 422


class UnauthorizedError(DetectError):
    code = "unauthorized"
    http_status = 401


class UnsupportedMediaTypeError(DetectError):
    """A request body that is neither multipart/form-data nor JSON."""

    code = "unsupported_media_type"
    http_status = 415


# --- data sets ---------------------------------------------------------------------------------------------
class DatasetError(DetectError):
    """A data set on disk is unusable: malformed or unsafe annotation XML, a missing field, a box outside its image,
    an unknown class, a missing or undecodable image. The message names the file (and the object, where one is at
    fault). A set-up problem for the CLI (exit code 2), not a crash."""

    code = "bad_annotation"
    http_status = 422
    exit_code = 2

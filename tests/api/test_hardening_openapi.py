"""Issue 12, item 8: the OpenAPI document and the service agree. Schemathesis generates requests from
``/openapi.json`` (valid ones, and ones the schema forbids) for every operation and checks each answer: no 5xx,
documented status codes, content types and response bodies, schema-invalid requests refused, and schema-valid
ones accepted.

Decisions:
* Generated images are real ones (a few PNG and JPEG files, for ``format: binary`` parts and ``format: byte``
  base64 strings): the schema cannot say "a decodable image", so random bytes would make every valid request an
  expected 415.
* Schema-valid requests may still be refused for what only the served model knows: an unknown model (404
  ``unknown_model``), class (422 ``unknown_class``) or proposal method (422 ``unsupported_proposals``). Any other
  refusal (in particular 422 ``invalid_request``, the server's own validation disagreeing with its schema) fails
  the run. That replaces schemathesis' ``positive_data_acceptance``, which allows no 422 at all.
* Schema-invalid requests may also be refused with 413 (``images`` above ``maxItems``). A schema-invalid form
  whose only fault is an empty list for a scalar field is skipped: a form cannot send an empty list, so what
  goes on the wire omits the field and is valid.
* Bounded: a fixed number of examples per operation, derandomised (the conftest profile), within ~20 s on two
  shared cores.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.specs.openapi import formats

from tests.helpers import png, running

EXAMPLES = {"POST /detect": 60}  # the one operation with a body; the others take no input at all
SEMANTIC_REFUSALS = {(404, "unknown_model"), (422, "unknown_class"), (422, "unsupported_proposals")}


def jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 30, 200)).save(buffer, format="JPEG")
    return buffer.getvalue()


IMAGES = [png(8, 8), png(31, 17, 200), jpeg(20, 40)]


@contextmanager
def image_formats() -> Iterator[None]:
    """``format: binary`` and ``format: byte`` strings are images while the run lasts."""
    registered = {"binary": st.sampled_from(IMAGES), "byte": st.sampled_from([base64.b64encode(i).decode() for i in IMAGES])}
    for name, strategy in registered.items():
        schemathesis.openapi.format(name, strategy)
    try:
        yield
    finally:
        for name in registered:
            formats.unregister_string_format(name)


def refused_valid_request(ctx, response, case) -> None:
    """A schema-valid request is answered 2xx, or refused only for what the served model alone knows."""
    if case.meta is None or not case.meta.generation.mode.is_positive or response.status_code < 400:
        return None
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = None
    if (response.status_code, code) not in SEMANTIC_REFUSALS:
        raise AssertionError(f"a schema-valid request was refused: {response.status_code} {response.text[:300]}")
    return None


def vanishes_in_a_form(case) -> bool:
    """A schema-invalid multipart case made invalid by an empty list: a form sends nothing for it, so the request
    on the wire omits that field, which is valid (schemathesis would report the 200 as an invalid request
    accepted)."""
    body = case.body if case.media_type == "multipart/form-data" else None
    return isinstance(body, dict) and any(value == [] for name, value in body.items() if name != "images")


def test_schema_and_behaviour_agree() -> None:
    config = schemathesis.Config.from_dict(
        {
            "checks": {
                "positive_data_acceptance": {"enabled": False},
                "negative_data_rejection": {"expected-statuses": [400, 404, 405, 413, 415, 422]},
            }
        }
    )
    failures: dict[str, str] = {}
    with running(max_images_per_request=3, max_body_bytes=1_000_000) as client, image_formats():
        base_url = str(client.base_url).rstrip("/")
        schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", config=config)
        for result in schema.get_all_operations():
            operation = result.ok()
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                run_operation(operation, mode, base_url, failures)
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())


def run_operation(operation, mode: GenerationMode, base_url: str, failures: dict[str, str]) -> None:
    examples = EXAMPLES.get(operation.label, 5)

    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case) -> None:
        if mode is GenerationMode.NEGATIVE and vanishes_in_a_form(case):
            return
        try:
            case.call_and_validate(base_url=base_url, additional_checks=[refused_valid_request])
        except (Exception, BaseExceptionGroup) as err:  # one example of each distinct failure; keep generating
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            what = " / ".join(lines[1:3]) if isinstance(err, BaseExceptionGroup) else lines[0] if lines else repr(err)
            failures.setdefault(f"{operation.label} [{mode.value}] {what[:200]}", str(err)[:2000])

    try:
        check()
    except Unsatisfiable:  # an operation without inputs has no schema-invalid request
        assert mode is GenerationMode.NEGATIVE


def test_multipart_fields_are_never_nullable(client: httpx.Client) -> None:
    """Form values are text: the literal ``null`` would be a string, so the form schema offers no null type; the
    JSON body keeps ``null`` as "omitted", and the server agrees with both."""
    spec = client.get("/openapi.json").json()
    form = spec["paths"]["/detect"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["images"] and form["properties"]["images"]["maxItems"] == 4
    for name, field in form["properties"].items():
        assert "null" not in str(field), (name, field)
    image = {"images": ("a.png", png(8, 8), "image/png")}
    assert client.post("/detect", files=image, data={"score_threshold": "null"}).status_code == 422
    assert client.post("/detect", json={"images": [{"data": base64.b64encode(png(8, 8)).decode()}], "score_threshold": None}).status_code == 200


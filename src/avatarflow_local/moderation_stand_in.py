"""Stand-ins for the moderation calls moto does not implement: Amazon Rekognition
DetectModerationLabels and DetectFaces, Amazon Comprehend DetectToxicContent.

Without one the local stack makes none of these calls (workflow_stack.LOCAL_PARAMETERS turns the
layers off, and the results say so). With one installed, the calls run as deployed: the IAM
check of the caller's role first (avatarflow_local.iam), botocore's own validation of the
request against the service model, then the limits the AWS documentation gives that botocore
does not check (image bytes at most 5 MB and PNG/JPEG, MinConfidence 0-100, the Attributes enum,
Comprehend's LanguageCode "en" and 10 segments of at most 1 KB), and every answer is validated
against the operation's output shape before it is returned.

What the stand-in answers is decided by the test that installs it (`image_labels`, `face_ages`,
`toxicity`): it has no model, so a local run proves the wiring, never a verdict on real content."""

from __future__ import annotations

import io
from collections.abc import Callable

import botocore.session
from botocore.validate import ParamValidator
from PIL import Image

from avatarflow_local import iam
from avatarflow_local.lambda_hook import _Response

MAX_IMAGE_BYTES = 5 * 1024 * 1024
MAX_SEGMENTS, MAX_SEGMENT_BYTES, MAX_LIST_BYTES = 10, 1024, 10 * 1024
_ACTIVE: ModerationStandIn | None = None


def _error(code: str, message: str, status: int = 400):
    return _Response(status, {}), {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status, "RequestId": "local-moderation"},
    }


class _Refused(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class ModerationStandIn:
    """image_labels(image) -> [ModerationLabel dicts]; face_ages(image) -> [(low, high)] one per
    face; toxicity(text) -> {label: score} (the segment's Toxicity is the highest score)."""

    def __init__(
        self,
        image_labels: Callable[[Image.Image], list[dict]] | None = None,
        face_ages: Callable[[Image.Image], list[tuple[int, int]]] | None = None,
        toxicity: Callable[[str], dict[str, float]] | None = None,
        fail_with: str | None = None,
    ):
        self.image_labels = image_labels or (lambda image: [])
        self.face_ages = face_ages or (lambda image: [(26, 34)])
        self.toxicity = toxicity or (lambda text: {})
        self.calls: list[tuple[str, dict]] = []
        # An error code every call is answered with (HTTP 500), as AWS answers in an outage.
        self.fail_with = fail_with
        session = botocore.session.get_session()
        self._models = {name: session.get_service_model(name) for name in ("rekognition", "comprehend")}

    def __enter__(self) -> ModerationStandIn:
        global _ACTIVE
        self._previous, _ACTIVE = _ACTIVE, self
        return self

    def __exit__(self, *exc) -> None:
        global _ACTIVE
        _ACTIVE = getattr(self, "_previous", None)

    # ------------------------------------------------------------------ answers
    def answer(self, service: str, operation: str, params: dict) -> dict:
        self.calls.append((f"{service}:{operation}", params))
        if service == "rekognition":
            image = self._image(params)
            if operation == "DetectModerationLabels":
                confidence = params.get("MinConfidence", 50.0)
                if not 0 <= confidence <= 100:
                    raise _Refused("InvalidParameterException", "MinConfidence must be between 0 and 100")
                labels = [lb for lb in self.image_labels(image) if lb["Confidence"] >= confidence]
                response = {"ModerationLabels": labels, "ModerationModelVersion": "7.0"}
            else:
                enum = self._models["rekognition"].shape_for("Attributes").member.enum
                if any(a not in enum for a in params.get("Attributes", [])):
                    raise _Refused("InvalidParameterException", f"Attributes must be among {enum}")
                faces = [
                    {"BoundingBox": {"Width": 0.5, "Height": 0.5, "Left": 0.25, "Top": 0.25},
                     "AgeRange": {"Low": low, "High": high}, "Confidence": 99.9}
                    for low, high in self.face_ages(image)
                ]
                response = {"FaceDetails": faces}
        else:
            if params["LanguageCode"] != "en":
                raise _Refused("UnsupportedLanguageException", "toxicity detection supports only en")
            segments = params["TextSegments"]
            sizes = [len(s["Text"].encode("utf-8")) for s in segments]
            if len(segments) > MAX_SEGMENTS or max(sizes) > MAX_SEGMENT_BYTES or sum(sizes) > MAX_LIST_BYTES:
                raise _Refused("TextSizeLimitExceededException", "at most 10 segments of 1 KB each")
            results = []
            for segment in segments:
                scores = self.toxicity(segment["Text"])
                results.append({"Labels": [{"Name": k, "Score": v} for k, v in scores.items()],
                                "Toxicity": max(scores.values(), default=0.0)})
            response = {"ResultList": results}
        output = self._models[service].operation_model(operation).output_shape
        report = ParamValidator().validate(response, output)
        if report.has_errors():
            raise AssertionError(f"stand-in answer does not fit {operation}: {report.generate_report()}")
        return response

    def _image(self, params: dict) -> Image.Image:
        data = params["Image"].get("Bytes")
        if data is None:
            raise _Refused("InvalidParameterException", "the stand-in reads Image.Bytes only")
        if len(data) > MAX_IMAGE_BYTES:
            raise _Refused("ImageTooLargeException", "image bytes are over 5 MB")
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except OSError:
            raise _Refused("InvalidImageFormatException", "the image is not a readable PNG or JPEG") from None
        if image.format not in ("PNG", "JPEG"):
            raise _Refused("InvalidImageFormatException", "Rekognition reads PNG or JPEG only")
        return image


def _before_call(model, params, context, **_kwargs):
    stand_in = _ACTIVE
    if stand_in is None:
        return None
    api_params = context.get(iam._PARAMS_KEY, {})
    if stand_in.fail_with:
        stand_in.calls.append((f"{model.service_model.service_name}:{model.name}", {}))
        return _error(stand_in.fail_with, "the service could not answer (stand-in outage)", 500)
    try:
        response = stand_in.answer(model.service_model.service_name, model.name, api_params)
    except _Refused as err:
        return _error(err.code, str(err))
    return _Response(200, {}), {**response, "ResponseMetadata": {"HTTPStatusCode": 200, "RequestId": "local"}}


iam.register_everywhere([(event, _before_call) for event in iam.INTERCEPTED[2:]])

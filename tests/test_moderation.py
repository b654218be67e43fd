"""avatarflow.moderation: the text policy's layers, its properties over every user-controlled input,
and the documented shapes of the AWS calls behind it (Comprehend DetectToxicContent, Rekognition
DetectModerationLabels / DetectFaces) checked with botocore's Stubber against the service model."""

import sys
from pathlib import Path

import boto3
import pytest
from botocore.stub import Stubber
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avatarflow import moderation, workflow
from avatarflow.moderation import BlockedText, ImagePolicy, ToxicityPolicy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "containers" / "inference"))

TERMS = sorted(moderation.terms())


# ---------------------------------------------------------------- the layers, by example

@pytest.mark.parametrize(
    ("text", "term"),
    [
        ("Nudes on a beach", "nude"),  # plural, case
        ("the model is undressing", "undress"),  # -ing
        ("with the children", "child"),  # -ren
        ("two teenagers", "teenager"),
        ("n\u0430ked", "naked"),  # Cyrillic a
        ("n\u03c5de", "nude"),  # Greek upsilon
        ("\uff4e\uff55\uff44\uff45", "nude"),  # full-width (NFKC)
        ("nu\u200bde", "nude"),  # zero-width space (Cf)
        ("nu\u00adde", "nude"),  # soft hyphen (Cf)
        ("nu\u2060de", "nude"),  # word joiner (Cf)
        ("n\u0308ude", "nude"),  # combining mark
        ("p0rn", "porn"),
        ("$exy", "sexy"),
        ("ch1ld", "child"),
        ("n.u.d.e", "nude"),
        ("g o r e", "gore"),
        ("a n u d e photo", "nude"),  # a single-letter word right before the separated letters
        ("n-a-k-e-d", "naked"),
        ("nude!", "nude"),
        ("swast1ka", "swastika"),
    ],
)
def test_evasions_are_found(text, term):
    assert term in moderation.blocked_terms(text)
    with pytest.raises(BlockedText) as caught:
        moderation.check_prompt(text)
    assert isinstance(caught.value, ValueError) and term in caught.value.terms


@pytest.mark.parametrize(
    "text",
    ["portrait of sks person as an astronaut, studio light", "Sussex countryside", "just kidding",
     "the minority report", "4k, 1990s film photo", "mother's ex", "Essex", "a kidney bean"],
)
def test_ordinary_text_passes(text):
    assert moderation.blocked_terms(text) == ()
    moderation.check_prompt(text)


def test_the_word_list_is_data_and_holds_base_forms():
    assert {"nude", "child", "gore", "swastika"} <= moderation.terms()
    assert all(t == t.strip().casefold() and t.isalpha() for t in moderation.terms())


def test_negative_prompt_rules():
    moderation.check_negative_prompt("nsfw, nude, lowres, blurry")  # naming what to avoid is the point
    with pytest.raises(BlockedText) as caught:
        moderation.check_negative_prompt("cl0thes, sh1rts")
    assert caught.value.field == "negative_prompt" and caught.value.terms == ("clothes", "shirt")


# ---------------------------------------------------------------- properties (hypothesis)

CONFUSABLE = {"a": "\u0430", "e": "\u0435", "o": "\u03bf", "i": "1", "s": "$", "c": "\u0441", "p": "\u0440"}
INVISIBLE = ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad"]


@st.composite
def disguised(draw):
    """A blocked term as an attacker would write it: case, look-alikes, invisible characters,
    one separator between single letters, an inflection, words around it."""
    term = draw(st.sampled_from(TERMS))
    letters = []
    for ch in term:
        if draw(st.booleans()) and ch in CONFUSABLE:
            ch = CONFUSABLE[ch]
        elif draw(st.booleans()):
            ch = ch.upper()
        letters.append(ch)
    style = draw(st.sampled_from(["plain", "invisible", "separated"]))
    if style == "invisible":
        word = "".join(ch + draw(st.sampled_from(["", *INVISIBLE])) for ch in letters)
    elif style == "separated":
        word = draw(st.sampled_from([".", " ", "-", "_", "*", "\u00b7"])).join(letters)
    else:
        word = "".join(letters)
    if style != "separated":
        word += draw(st.sampled_from(["", "s", "es"]))
    before = draw(st.sampled_from(["", "a photo of ", "sks person, "]))
    after = draw(st.sampled_from(["", ", studio light", " at night"]))
    return term, before + word + after


@settings(max_examples=300, deadline=None)
@given(disguised())
def test_property_disguised_terms_are_always_found(case):
    term, text = case
    assert term in moderation.blocked_terms(text), text


USER_TEXT = st.text(
    alphabet=st.sampled_from([*"abcdeghiklmnoprstuvxyz .,-!1034$@", *INVISIBLE, "\u0430", "\u0435",
                              "\u03c5"]),
    max_size=40,
)
# Tokens as request.json may hold them: often a word of the list, else random letters.
TOKENS = st.one_of(st.sampled_from(TERMS), st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=3,
                                                   max_size=12))
CLASSES = st.one_of(st.sampled_from([*workflow.SUBJECT_CLASSES, "child", "kid", "dragon"]), TOKENS)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=st.one_of(USER_TEXT, disguised().map(lambda c: c[1])), token=TOKENS, subject_class=CLASSES)
def test_property_no_user_input_puts_a_blocked_term_in_the_pipeline_text(prompt, token, subject_class):
    """Every user-controlled input (the prompt the API accepts, the token and class that
    build_dataset keeps from request.json, and the text the container builds from them): when each
    part passes its gate, the combination the pipeline receives holds no blocked term, and the
    container's own gate (pipeline_prompt) accepts it."""
    import inference_engine

    subject, _ = workflow.training_subject({"token": token, "subject_class": subject_class})
    assert moderation.blocked_terms(subject["token"]) == ()
    assert moderation.blocked_terms(subject["class_prompt"]) == ()
    assert moderation.blocked_terms(subject["instance_prompt"]) == ()
    try:
        moderation.check_prompt(prompt.strip())  # the API's gate
    except BlockedText:
        with pytest.raises(inference_engine.RequestInvalid):  # and the container's refuses it too
            inference_engine.pipeline_prompt(prompt.strip(), subject["token"], subject["subject_class"])
        return
    if not prompt.strip():
        return
    text = inference_engine.pipeline_prompt(prompt.strip(), subject["token"], subject["subject_class"])
    assert moderation.blocked_terms(text) == ()


# ---------------------------------------------------------------- token and subject class

@pytest.mark.parametrize("token", ["nude", "porn", "kids", "gore"])
def test_a_blocked_token_falls_back_with_a_reason(token):
    subject, issues = workflow.training_subject({"token": token})
    assert subject["token"] == workflow.DEFAULT_TOKEN
    assert any("may not contain" in issue for issue in issues)


def test_child_is_not_a_subject_class():
    assert "child" not in workflow.SUBJECT_CLASSES
    subject, issues = workflow.training_subject({"subject_class": "child"})
    assert subject["subject_class"] == workflow.DEFAULT_SUBJECT_CLASS and issues
    for subject_class in workflow.SUBJECT_CLASSES:
        assert moderation.blocked_terms(subject_class) == ()


# ---------------------------------------------------------------- Comprehend DetectToxicContent

def test_text_segments_respect_comprehends_limits():
    text = " ".join(["\u00e9t\u00e9"] * 900)  # 2-byte characters, ~6.3 KB
    segments = moderation.text_segments(text)
    assert 1 < len(segments) <= moderation.MAX_SEGMENTS
    assert all(len(s["Text"].encode("utf-8")) <= moderation.MAX_SEGMENT_BYTES for s in segments)
    assert " ".join(s["Text"] for s in segments) == text
    with pytest.raises(ValueError):
        moderation.text_segments("x" * (11 * 1024))


# The documented response shape (Comprehend API reference, DetectToxicContent).
TOXIC_RESPONSE = {
    "ResultList": [
        {
            "Labels": [
                {"Name": "PROFANITY", "Score": 0.62}, {"Name": "HATE_SPEECH", "Score": 0.02},
                {"Name": "INSULT", "Score": 0.71}, {"Name": "GRAPHIC", "Score": 0.01},
                {"Name": "HARASSMENT_OR_ABUSE", "Score": 0.09}, {"Name": "SEXUAL", "Score": 0.83},
                {"Name": "VIOLENCE_OR_THREAT", "Score": 0.01},
            ],
            "Toxicity": 0.79,
        }
    ]
}


def test_toxicity_labels_with_documented_shapes():
    client = boto3.client("comprehend", region_name="us-east-1", aws_access_key_id="x",
                          aws_secret_access_key="x")
    policy = ToxicityPolicy.from_env({"PROMPT_TOXICITY_CHECK": "comprehend",
                                      "PROMPT_TOXICITY_THRESHOLD": "0.9"})
    with Stubber(client) as stub:
        stub.add_response("detect_toxic_content", TOXIC_RESPONSE,
                          {"TextSegments": [{"Text": "some prompt"}], "LanguageCode": "en"})
        # PROFANITY and INSULT are not in the default labels; SEXUAL is; Toxicity 0.79 < 0.9.
        assert moderation.toxicity_labels(client, "some prompt", policy) == ("SEXUAL",)
    assert moderation.toxicity_labels(client, "x", ToxicityPolicy()) == ()  # off: no call at all
    with pytest.raises(ValueError):
        ToxicityPolicy.from_env({"PROMPT_TOXIC_LABELS": "SEXUAL,PROMPT_SAFETY"})


# ---------------------------------------------------------------- Rekognition: images and faces

def test_image_policy_follows_the_taxonomy_and_confidence():
    policy = ImagePolicy.from_env("X", {"X_MIN_CONFIDENCE": "80", "X_CATEGORIES": "Explicit,Violence"})
    response = {"ModerationLabels": [
        {"Name": "Exposed Male Genitalia", "ParentName": "Explicit Nudity", "Confidence": 91.0,
         "TaxonomyLevel": 3},
        {"Name": "Explicit Nudity", "ParentName": "Explicit", "Confidence": 91.0, "TaxonomyLevel": 2},
        {"Name": "Explicit", "ParentName": "", "Confidence": 91.0, "TaxonomyLevel": 1},
    ]}
    labels = policy.labels(response)
    assert policy.withholds(labels)
    # A level-3 label withholds through its parent chain (Explicit Nudity -> Explicit).
    assert policy.withholds(labels[:2])
    assert not ImagePolicy(categories=("Violence",)).withholds(labels)
    assert not policy.withholds([{**labels[0], "confidence": 79.0}])  # under MinConfidence
    swim = policy.labels({"ModerationLabels": [
        {"Name": "Swimwear or Underwear", "ParentName": "", "Confidence": 99.0, "TaxonomyLevel": 1}]})
    assert not policy.withholds(swim)
    with pytest.raises(ValueError):
        ImagePolicy.from_env("X", {"X_MIN_CONFIDENCE": "0.9e3"})


def test_minor_face_policies():
    ranges = ((13, 19), (16, 24), (29, 37))
    teen, young_adult, adult = ({"AgeRange": {"Low": lo, "High": hi}} for lo, hi in ranges)
    assert moderation.minor_face([teen], "possible") and moderation.minor_face([young_adult], "possible")
    assert moderation.minor_face([teen], "likely") and not moderation.minor_face([young_adult], "likely")
    assert not moderation.minor_face([adult], "possible") and not moderation.minor_face([teen], "allow")
    with pytest.raises(ValueError):
        moderation.minor_face([adult], "sometimes")


def test_rekognition_requests_fit_the_service_model():
    """The requests preprocess_image and the container send, against botocore's model (Stubber
    validates both the parameters and the documented response shapes)."""
    client = boto3.client("rekognition", region_name="us-east-1", aws_access_key_id="x",
                          aws_secret_access_key="x")
    with Stubber(client) as stub:
        stub.add_response(
            "detect_faces",
            {"FaceDetails": [{"AgeRange": {"Low": 14, "High": 20}, "Confidence": 99.9,
                              "BoundingBox": {"Width": 0.4, "Height": 0.5, "Left": 0.3, "Top": 0.2}}]},
            {"Image": {"Bytes": b"jpeg"}, "Attributes": ["AGE_RANGE"]},
        )
        faces = client.detect_faces(Image={"Bytes": b"jpeg"}, Attributes=["AGE_RANGE"])["FaceDetails"]
    assert moderation.minor_face(faces, "possible")


def test_emails_explain_moderation_rejections_in_plain_words():
    from avatarflow import faces, notifications

    rejections = [{"name": n, "reason": r, "message": faces.REASON_MESSAGES[r]}
                  for n, r in (("kid.jpg", "possible_minor"), ("beach.jpg", "unsafe_content"))]
    mail = notifications.rejected("u1", "b1", {"accepted": 2, "min_images": 8, "rejections": rejections})
    text = mail["message"]
    assert "kid.jpg: The person in this photo may be under 18" in text
    assert "beach.jpg: Our content check flagged this photo" in text
    assert "only make avatar models of adults" in text and "never used for training" in text
    ready = notifications.ready("u1", "b1", "v1", None, {"accepted": 9, "rejections": rejections[:1]})
    assert "under 18" in ready["message"]

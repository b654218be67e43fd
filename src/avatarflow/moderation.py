"""Content safety: one policy for every text that can reach a prompt, and the checks of images.

Text (the prompt, the DreamBooth token, the subject class, style presets) goes through the same
layers, cheapest first:

1. normalisation: Unicode NFKC, case folding, format characters (Unicode Cf: zero-width space,
   joiners, soft hyphen, bidi marks) and combining marks removed, look-alike characters
   (Cyrillic/Greek letters, leetspeak digits and symbols; moderation_data/confusables.json)
   mapped to the Latin letters they imitate, and runs of single letters split by separators
   ("n.u.d.e", "n u d e") joined into one word;
2. a word list kept as data (moderation_data/blocked_terms.txt), matched on whole words and
   their simple inflections (plural -s/-es/-ies, -ren, -ed/-ing/-er), never on substrings (so
   "Sussex" and "kidding" pass);
3. in the cloud, Amazon Comprehend DetectToxicContent on the prompt (toxicity_labels), with the
   thresholds from template parameters. Comprehend's prompt-safety classifier is closed to new
   customers and is not used.

The negative prompt has its own rule (check_negative_prompt): blocked terms are allowed there
(steering away from "nude" is how people keep images safe), but words whose avoidance steers
toward nudity ("clothes", "dressed": moderation_data/negative_blocked.txt) are refused.

Images: ImagePolicy decides from Rekognition DetectModerationLabels labels whether an image is
withheld; minor_face from DetectFaces' AgeRange whether an upload shows a minor.
See docs/security.md "Content moderation" for thresholds and known limits."""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources

_DATA = "moderation_data"


class BlockedText(ValueError):
    """A text with blocked terms; `.terms` are the normalised terms found (never logged)."""

    def __init__(self, terms: Iterable[str], field: str = "prompt"):
        self.terms = tuple(terms)
        self.field = field
        super().__init__(f"{field} contains terms that are not allowed: {', '.join(self.terms)}")


def _lines(name: str) -> tuple[str, ...]:
    text = resources.files("avatarflow").joinpath(_DATA, name).read_text(encoding="utf-8")
    return tuple(
        line.strip().casefold() for line in text.splitlines() if line.strip() and not line.startswith("#")
    )


@cache
def terms() -> frozenset[str]:
    """The blocked words (base forms), from the package data file."""
    return frozenset(_lines("blocked_terms.txt"))


@cache
def negative_terms() -> frozenset[str]:
    """Words a negative prompt may not contain (their avoidance steers toward nudity)."""
    return frozenset(_lines("negative_blocked.txt"))


@cache
def _confusables() -> tuple[dict[int, str], ...]:
    """One str.translate table per variant: variant k takes the k-th alternative of every
    character (or its last one)."""
    raw = json.loads(resources.files("avatarflow").joinpath(_DATA, "confusables.json").read_text("utf-8"))
    table = {k: v for k, v in raw.items() if not k.startswith("_")}
    for char, targets in table.items():
        if len(char) != 1 or not targets or not all(isinstance(t, str) and len(t) == 1 for t in targets):
            raise ValueError(f"confusables.json: bad entry {char!r}")
    width = max(len(t) for t in table.values())
    return tuple({ord(c): t[min(k, len(t) - 1)] for c, t in table.items()} for k in range(width))


_WORD = re.compile(r"[^\W_]+")
_DROP = {"Cf", "Mn", "Me"}  # format characters (zero-width, bidi, soft hyphen), combining marks
_SUFFIXES = ("ren", "ies", "es", "s", "ing", "ers", "er", "ed", "d")


def _folded(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(ch for ch in unicodedata.normalize("NFD", text) if unicodedata.category(ch) not in _DROP)
    return unicodedata.normalize("NFC", text)


_LONGEST_JOIN = 24  # no listed term is longer


def _words(text: str) -> list[str]:
    """Words of a normalised text; within each run of single letters ("a n u d e"), every
    stretch of two or more letters joined too."""
    out: list[str] = []
    run: list[str] = []
    for word in [*_WORD.findall(text), ""]:
        if len(word) == 1:
            run.append(word)
            continue
        for start in range(len(run)):
            for end in range(start + 2, min(len(run), start + _LONGEST_JOIN) + 1):
                out.append("".join(run[start:end]))
        out += run
        run = []
        if word:
            out.append(word)
    return out


def normalised_words(text: str) -> set[str]:
    """Every word the text can be read as, over all look-alike variants."""
    folded = _folded(text)
    found: set[str] = set()
    for table in _confusables():
        found.update(_words(folded.translate(table)))
    return found


def _forms(word: str) -> set[str]:
    """The word and its candidate base forms (simple English inflections)."""
    forms = {word}
    for suffix in _SUFFIXES:
        stem = word[: -len(suffix)]
        if word.endswith(suffix) and len(stem) >= 2:
            forms.add(stem)
            if suffix == "ies":
                forms.add(stem + "y")
            if suffix in ("ing", "ed", "er", "ers"):
                forms.add(stem + "e")
    return forms


def _found(text: str, listed: frozenset[str]) -> tuple[str, ...]:
    hits = set()
    for word in normalised_words(text):
        hits.update(_forms(word) & listed)
    return tuple(sorted(hits))


def blocked_terms(text: str) -> tuple[str, ...]:
    """The blocked terms (as listed) that the text contains once normalised; empty = clean."""
    return _found(text, terms())


def check_prompt(text: str, field: str = "prompt") -> None:
    """Raise BlockedText when the text (a prompt, token, subject class, preset) holds a blocked term."""
    found = blocked_terms(text)
    if found:
        raise BlockedText(found, field)


def check_negative_prompt(text: str) -> None:
    """A negative prompt may name what to avoid, but not clothing (avoiding it asks for nudity)."""
    found = _found(text, negative_terms())
    if found:
        raise BlockedText(found, "negative_prompt")


# --------------------------------------------------------------------------- Comprehend

TOXIC_LABELS = (
    "PROFANITY", "HATE_SPEECH", "INSULT", "GRAPHIC", "HARASSMENT_OR_ABUSE", "SEXUAL", "VIOLENCE_OR_THREAT",
)
# DetectToxicContent: LanguageCode "en" only; at most 10 TextSegments of at most 1 KB (UTF-8) each.
TOXICITY_LANGUAGE = "en"
MAX_SEGMENTS = 10
MAX_SEGMENT_BYTES = 1024


@dataclass(frozen=True)
class ToxicityPolicy:
    """PROMPT_TOXICITY_CHECK=comprehend turns the layer on (the template's PromptToxicityCheck)."""

    enabled: bool = False
    toxicity_threshold: float = 0.5  # the overall Toxicity score of any segment (0-1)
    label_threshold: float = 0.5  # the score of any label in `labels` (0-1)
    labels: tuple[str, ...] = (
        "HATE_SPEECH", "GRAPHIC", "HARASSMENT_OR_ABUSE", "SEXUAL", "VIOLENCE_OR_THREAT",
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ToxicityPolicy:
        env = os.environ if env is None else env  # read at call time (Lambda's environment)
        raw = env.get("PROMPT_TOXIC_LABELS", ",".join(cls.labels))
        labels = tuple(x.strip() for x in raw.split(",") if x.strip())
        unknown = set(labels) - set(TOXIC_LABELS)
        if unknown:
            raise ValueError(f"PROMPT_TOXIC_LABELS: unknown labels {sorted(unknown)}")
        policy = cls(
            enabled=env.get("PROMPT_TOXICITY_CHECK", "off").strip().lower() == "comprehend",
            toxicity_threshold=float(env.get("PROMPT_TOXICITY_THRESHOLD", cls.toxicity_threshold)),
            label_threshold=float(env.get("PROMPT_TOXIC_LABEL_THRESHOLD", cls.label_threshold)),
            labels=labels,
        )
        for value in (policy.toxicity_threshold, policy.label_threshold):
            if not 0 <= value <= 1:
                raise ValueError("toxicity thresholds are scores between 0 and 1")
        return policy


def text_segments(text: str) -> list[dict[str, str]]:
    """The text as DetectToxicContent TextSegments: pieces of at most MAX_SEGMENT_BYTES of UTF-8,
    cut at whitespace where one is near (never inside a character); ValueError past MAX_SEGMENTS."""
    segments: list[dict[str, str]] = []
    rest = text.strip()
    while rest:
        data = rest.encode("utf-8")
        if len(data) <= MAX_SEGMENT_BYTES:
            piece = rest
        else:
            piece = data[:MAX_SEGMENT_BYTES].decode("utf-8", errors="ignore")
            cut = piece.rfind(" ")
            if cut > len(piece) // 2:
                piece = piece[:cut]
        segments.append({"Text": piece})
        rest = rest[len(piece) :].strip()
    if len(segments) > MAX_SEGMENTS:
        raise ValueError(f"text is longer than {MAX_SEGMENTS} segments of {MAX_SEGMENT_BYTES} bytes")
    return segments


def toxicity_labels(client, text: str, policy: ToxicityPolicy) -> tuple[str, ...]:
    """Comprehend's verdict: the labels (and "TOXICITY") at or over the policy's thresholds."""
    if not policy.enabled or not text.strip():
        return ()
    response = client.detect_toxic_content(TextSegments=text_segments(text), LanguageCode=TOXICITY_LANGUAGE)
    found = set()
    for result in response.get("ResultList", []):
        if result.get("Toxicity", 0.0) >= policy.toxicity_threshold:
            found.add("TOXICITY")
        for label in result.get("Labels", []):
            if label.get("Name") in policy.labels and label.get("Score", 0.0) >= policy.label_threshold:
                found.add(label["Name"])
    return tuple(sorted(found))


# --------------------------------------------------------------------------- images

# Rekognition's top-level moderation categories (taxonomy v7) that withhold an image by default.
DEFAULT_IMAGE_CATEGORIES = (
    "Explicit",
    "Non-Explicit Nudity of Intimate parts and Kissing",
    "Violence",
    "Visually Disturbing",
    "Hate Symbols",
)


@dataclass(frozen=True)
class ImagePolicy:
    """DetectModerationLabels' MinConfidence (0-100) and the categories that withhold an image
    (a label withholds when it or one of its parents is listed)."""

    min_confidence: float = 50.0
    categories: tuple[str, ...] = DEFAULT_IMAGE_CATEGORIES

    @classmethod
    def from_env(cls, prefix: str, env: Mapping[str, str] | None = None) -> ImagePolicy:
        env = os.environ if env is None else env
        confidence = float(env.get(f"{prefix}_MIN_CONFIDENCE", cls.min_confidence))
        if not 0 <= confidence <= 100:
            raise ValueError(f"{prefix}_MIN_CONFIDENCE is a percentage (0-100)")
        raw = env.get(f"{prefix}_CATEGORIES")
        categories = tuple(c.strip() for c in raw.split(",") if c.strip()) if raw else cls.categories
        return cls(confidence, categories)

    def labels(self, response: Mapping) -> list[dict]:
        """DetectModerationLabels' labels in result.json's shape."""
        return [
            {
                "name": label.get("Name", ""),
                "parent": label.get("ParentName") or None,
                "confidence": round(float(label.get("Confidence", 0.0)), 3),
                "level": label.get("TaxonomyLevel"),
            }
            for label in response.get("ModerationLabels", [])
        ]

    def withholds(self, labels: list[dict]) -> bool:
        parents = {label["name"]: label["parent"] for label in labels}
        for label in labels:
            if label["confidence"] < self.min_confidence:
                continue
            name, seen = label["name"], set()
            while name and name not in seen:
                if name in self.categories:
                    return True
                seen.add(name)
                name = parents.get(name)
        return False


# --------------------------------------------------------------------------- uploads

ADULT_AGE = 18
MINOR_POLICIES = ("possible", "likely", "allow")


def minor_face(face_details: list[Mapping], policy: str) -> bool:
    """DetectFaces (Attributes AGE_RANGE) -> whether a face counts as a minor's.

    "possible" (the default): the estimated range reaches under 18 (AgeRange.Low < 18). Ranges
    are wide and overlap (AWS: a 6-year-old may be estimated 4-8), so this also turns away some
    young adults; the harm of training on a child's face outweighs asking them for other photos.
    "likely": the range's middle is under 18. "allow": never."""
    if policy not in MINOR_POLICIES:
        raise ValueError(f"minor policy must be one of {MINOR_POLICIES}")
    if policy == "allow":
        return False
    for face in face_details:
        age = face.get("AgeRange") or {}
        low, high = age.get("Low"), age.get("High")
        if low is None or high is None:
            continue
        if (low if policy == "possible" else (low + high) / 2) < ADULT_AGE:
            return True
    return False

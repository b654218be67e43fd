"""The avatar-pack style catalogue, kept as data.

The defaults are `styles.json` next to this module (shipped in the layer). Operators add or
replace presets without a code change by putting a catalogue of the same shape at
`s3://<data bucket>/config/styles.json` (keys.STYLES_OBJECT): a preset with a default's
name replaces it, a new name is appended. Every catalogue is validated when it is loaded:
the schema (pydantic, strict, unknown fields refused) and the moderation policy
(`avatarflow.moderation.check_prompt` on every text that reaches a prompt), so a preset that
would be refused as a user's prompt can never be generated on the user's behalf either.

Presets leave the image size unset by default: the endpoint then uses the base model's native
size (512 px for SD 1.5, 1024 px for SDXL), which is why one catalogue suits both families.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from typing import Annotated

from botocore.exceptions import ClientError
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from avatarflow import keys, moderation

NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{1,31}$"
MAX_STYLES = 50
PLACEHOLDERS = ("{token}", "{subject_class}")
MAX_SEED = 2**32 - 1 - 8  # the endpoint seeds image i with seed + i


class CatalogueError(ValueError):
    """A catalogue that does not validate (schema or moderation); the message names the style."""


def _moderate(text: str, *, negative: bool = False) -> None:
    """The one call site of the moderation policy for presets (avatarflow.moderation; raises
    its BlockedText, a ValueError): the prompt and title as prompts, the negative prompt by the
    negative-prompt rules (blocked terms allowed there, steering toward nudity not)."""
    if negative:
        moderation.check_negative_prompt(text)
    else:
        moderation.check_prompt(text)


Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=400)]


class Style(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
    title: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=60)]
    prompt: Text
    negative_prompt: Annotated[str, StringConstraints(strip_whitespace=True, max_length=400)] = ""
    width: Annotated[int | None, Field(ge=256, le=1024, multiple_of=8)] = None
    height: Annotated[int | None, Field(ge=256, le=1024, multiple_of=8)] = None
    steps: Annotated[int, Field(ge=10, le=80)] = 30
    guidance_scale: Annotated[float, Field(ge=1.0, le=15.0, allow_inf_nan=False)] = 7.0
    seeds: Annotated[tuple[Annotated[int, Field(ge=0, le=MAX_SEED)], ...], Field(min_length=1, max_length=8)]

    @field_validator("prompt")
    @classmethod
    def _placeholders(cls, prompt: str) -> str:
        for placeholder in PLACEHOLDERS:
            if placeholder not in prompt:
                raise ValueError(f"prompt must contain {placeholder}")
        try:
            prompt.format(token="t", subject_class="c")  # noqa: S106 - a placeholder, not a secret
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError("prompt may use only the {token} and {subject_class} placeholders") from err
        return prompt

    def render(self, token: str, subject_class: str) -> str:
        return self.prompt.format(token=token, subject_class=subject_class)

    def seed(self, round_index: int) -> int:
        """The seed of a round: round 0 uses seeds[0], a regeneration the next one."""
        return self.seeds[round_index % len(self.seeds)]


class Catalogue(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    version: int = 1
    styles: Annotated[tuple[Style, ...], Field(min_length=1, max_length=MAX_STYLES)]


def _validate(text: str | bytes, source: str) -> tuple[Style, ...]:
    try:
        catalogue = Catalogue.model_validate_json(text)
    except ValidationError as err:
        first = err.errors(include_input=False, include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise CatalogueError(f"{source}: {where}: {first['msg']}") from None
    names = [s.name for s in catalogue.styles]
    if len(set(names)) != len(names):
        raise CatalogueError(f"{source}: style names must be unique")
    for style in catalogue.styles:
        # Placeholders are filled with neutral values: the catalogue's own words are checked.
        checks = [(style.render("sks", "person"), False), (style.title, False)]
        if style.negative_prompt:
            checks.append((style.negative_prompt, True))
        for text, negative in checks:
            try:
                _moderate(text, negative=negative)
            except ValueError as err:
                raise CatalogueError(
                    f"{source}: style {style.name} is refused by the moderation policy"
                ) from err
    return catalogue.styles


def parse(text: str | bytes, source: str = "catalogue") -> tuple[Style, ...]:
    return _validate(text, source)


def defaults() -> tuple[Style, ...]:
    return parse(resources.files("avatarflow").joinpath("styles.json").read_text("utf-8"), "styles.json")


def merge(base: Iterable[Style], extra: Iterable[Style]) -> tuple[Style, ...]:
    """base with extra's presets: same name replaces (in place), new names are appended."""
    merged = {s.name: s for s in base}
    merged.update({s.name: s for s in extra})
    if len(merged) > MAX_STYLES:
        raise CatalogueError(f"more than {MAX_STYLES} styles")
    return tuple(merged.values())


def load(extra_text: str | bytes | None = None) -> tuple[Style, ...]:
    """The defaults merged with the operator's catalogue (its text, or None when there is none)."""
    base = defaults()
    if extra_text is None:
        return base
    return merge(base, parse(extra_text, "config/styles.json"))


def load_from_bucket(s3, bucket: str) -> tuple[Style, ...]:
    """The defaults plus the operator's catalogue object (keys.STYLES_OBJECT) in `bucket`;
    absent (404, or 403 to a role without s3:ListBucket) means the defaults alone.

    Example:
        >>> load_from_bucket(boto3.client("s3"), "avatarflow-data")  # doctest: +SKIP
    """
    try:
        body = s3.get_object(Bucket=bucket, Key=keys.STYLES_OBJECT)["Body"].read()
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "AccessDenied", "403"):
            return load(None)
        raise
    return load(body)


def pick(catalogue: tuple[Style, ...], names: Iterable[str] | None, count: int) -> tuple[Style, ...]:
    """The styles of a pack: the named ones (in the order asked, unknown names refused), else
    the first `count` of the catalogue."""
    if names is None:
        return catalogue[: max(count, 0)]
    by_name = {s.name: s for s in catalogue}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise CatalogueError(f"unknown styles: {', '.join(sorted(unknown))}")
    return tuple(by_name[n] for n in dict.fromkeys(names))

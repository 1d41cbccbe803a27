"""docs/protocol.md agrees with the schemas: its examples validate and nothing is undocumented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from schemas.messages import MESSAGES, decode
from schemas.topics import Kind

DOC = (Path(__file__).parents[2] / "docs" / "protocol.md").read_text()
EXAMPLES = re.findall(r"```json (\w+)\n(.*?)\n```", DOC, flags=re.S)
BY_NAME = {m.__name__: m for m in MESSAGES}


@pytest.mark.parametrize(("model", "payload"), EXAMPLES)
def test_every_example_validates_against_its_model(model: str, payload: str) -> None:
    assert model in BY_NAME, f"example names unknown model {model}"
    decoded = decode(BY_NAME[model], payload.encode())
    assert decoded.encode() == payload.encode()  # examples are written exactly as sent


def test_every_message_has_an_example_and_a_topic_row() -> None:
    with_examples = {model for model, _ in EXAMPLES}
    assert with_examples == set(BY_NAME)
    for name in BY_NAME:
        assert re.search(rf"^\|[^|]+\| {name} \|", DOC, flags=re.M), f"no topic row for {name}"


def test_every_topic_kind_is_documented() -> None:
    documented = set()
    for kind in Kind:
        if kind is Kind.ARTIFACT_CHUNK:
            pattern = r"artifacts/\{hex\}/\{index\}"
        elif kind is Kind.ARTIFACT_REQUEST:
            pattern = r"`artifacts/request`"
        elif kind is Kind.UPLOAD_OFFER:
            pattern = r"uploads/\{hex\}/offer"
        elif kind is Kind.UPLOAD_CHUNK:
            pattern = r"uploads/\{hex\}/\{index\}"
        elif kind is Kind.JOB_STATUS:
            pattern = r"`jobs/\{job\}/status`"
        else:
            pattern = rf"/{kind.value}[`/]"
        if re.search(pattern, DOC):
            documented.add(kind)
    assert documented == set(Kind)

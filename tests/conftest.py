"""Shared fixtures: a tiny real open_clip architecture, a fake encoder with hand-made vectors,
and helpers that write policies and images."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from moderation.backends import EncoderBase

TINY_ARCH = "tiny-test-clip"
# vision head_width must be <= width; a 32-px image in 8-px patches keeps it fast.
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(autouse=True, scope="session")
def _hermetic_state(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Caches and the decision log go to temporary folders, never the user's home."""
    import os

    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("data"))
    os.environ["MODERATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True)
def _own_decision_log(tmp_path_factory: pytest.TempPathFactory,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test its own default decision log (and so its own policy activations)."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("data")))


@pytest.fixture
def postgres_url() -> str:
    """A new, empty database on the test server (MODERATION_TEST_POSTGRES_URL: .ci/run
    starts PostgreSQL with pgvector); the test is skipped without one."""
    import os
    import uuid

    server = os.environ.get("MODERATION_TEST_POSTGRES_URL")
    if not server:
        pytest.skip("MODERATION_TEST_POSTGRES_URL is not set (.ci/run starts PostgreSQL)")
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(scope="session")
def tiny_arch_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny architecture's JSON, registered with open_clip under :data:`TINY_ARCH`."""
    import open_clip

    path = tmp_path_factory.mktemp("arch") / f"{TINY_ARCH}.json"
    path.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_encoder(tiny_arch_file: Path) -> Any:
    from moderation.backends import RandomWeightsWarning
    from moderation.backends.torch import Encoder

    with pytest.warns(RandomWeightsWarning):
        return Encoder.load(TINY_ARCH, random_weights=True, batch_size=4)


def unit(*xs: float) -> np.ndarray:
    v = np.asarray(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


class FakeEncoder(EncoderBase):  # the capabilities an encoder without them declares
    """Hand-made vectors: texts by exact lookup, solid-colour images by their nearest colour.

    Counts every text it is asked to encode, so tests can prove what the cache saved.
    """

    identity = "fake/hand-made"
    image_size = 8

    def __init__(
        self,
        texts: dict[str, np.ndarray],
        colours: dict[tuple[int, int, int], np.ndarray] | None = None,
    ) -> None:
        self.texts = texts
        self.colours = colours or {}
        self.encoded_texts: list[str] = []
        self.image_calls = 0

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        self.encoded_texts += list(texts)
        return np.stack([self.texts[t] for t in texts]).astype(np.float32)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        self.image_calls += 1
        out = []
        for image in images:
            pixel = np.asarray(image.convert("RGB").getpixel((0, 0)), dtype=float)
            colour = min(self.colours, key=lambda c: float(np.sum((np.array(c) - pixel) ** 2)))
            out.append(self.colours[colour])
        return np.stack(out).astype(np.float32)


# A two-category policy whose every score can be worked out on paper (see test_scoring.py).
HAND_POLICY: dict[str, Any] = {
    "name": "hand",
    "model": {"name": "fake", "pretrained": "hand-made"},
    "templates": ["a {}", "the {}"],
    "top_terms": 2,
    "categories": {
        "weapons": {
            "description": "guns",
            "terms": ["gun", "rifle"],
            "exceptions": ["toy gun"],
            "action": "block",
            "threshold": {"value": 0.8, "review_from": 0.6},
        },
        "alcohol": {
            "description": "drinks",
            "terms": ["beer"],
            "action": "flag",
            "threshold": {"value": 0.5},
        },
    },
}
HAND_TEXTS = {
    "a gun": unit(1, 0, 0),
    "the gun": unit(0, 1, 0),
    "a rifle": unit(1, 0, 0),
    "the rifle": unit(1, 0, 0),
    "a toy gun": unit(0, 0, 1),
    "the toy gun": unit(0, 0, 1),
    "a beer": unit(0, 1, 0),
    "the beer": unit(0, 1, 0),
}
RED, BLUE, PURPLE, GREEN, GREY = (255, 0, 0), (0, 0, 255), (128, 0, 128), (0, 255, 0), (90, 90, 90)
HAND_COLOURS = {
    RED: unit(1, 0, 0),  # a rifle: weapons blocks
    BLUE: unit(0, 0, 1),  # a toy gun: the exception wins
    PURPLE: unit(1, 0, 1),  # between a gun and a toy gun: review band
    GREEN: unit(0, 1, 0),  # a beer: alcohol flags
    GREY: unit(-1, -1, -1),  # nothing at all
}
# the same vectors by what they show, for tests that store or score vectors directly
RIFLE, TOY, BETWEEN, BEER, NOTHING = (HAND_COLOURS[c] for c in (RED, BLUE, PURPLE, GREEN, GREY))


@pytest.fixture
def write_policy(tmp_path: Path) -> Callable[..., Path]:
    """Write a policy dict (default: :data:`HAND_POLICY`) as YAML and return its path."""

    def write(data: dict[str, Any] | None = None, name: str = "policy.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data if data is not None else HAND_POLICY, sort_keys=False))
        return path

    return write


@pytest.fixture
def fake_encoder() -> FakeEncoder:
    return FakeEncoder(dict(HAND_TEXTS), dict(HAND_COLOURS))


def animation_bytes(*colours: tuple[int, int, int], duration: int = 40) -> bytes:
    """An animated GIF of 16-px solid-colour frames, one per colour."""
    import io

    frames = [Image.new("RGB", (16, 16), c) for c in colours]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=duration)
    return buffer.getvalue()


def image_bytes(colour: tuple[int, int, int], fmt: str = "PNG", size: tuple[int, int] = (16, 16),
                **save: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, fmt, **save)
    return buffer.getvalue()

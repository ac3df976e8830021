"""The facade: ``Moderator.from_policy(path)`` then ``.moderate(images)``."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .backends import EncoderSpec, ImageTextEncoder, load_encoder
from .banks import HashMatcher, with_matches
from .decision import Decision
from .errors import ImageError, ModelMismatchError, PolicyLimitError
from .hashing import PDQ_MIN_SIDE, UploadHashes, pdq_of
from .images import DecodedImage, ImageLimits, check_pixels, decode_image, prepare_frame
from .policy import DEFAULT_PROFILE, Policy, PolicyLimits, excerpt, load_policy
from .prompts import (
    EmbeddingCache,
    OverlayCache,
    PolicyEmbeddings,
    VectorCache,
    embed_policy,
    embed_query,
    missing_prompts,
)
from .scorer import Scorer
from .video import VideoLimits, VideoSampling, decode_video, is_video
from .views import View, crop_key


def _sha256(source: bytes | str | Path) -> str:
    """The SHA-256 (hex) of bytes, or of a file read in pieces."""
    if isinstance(source, bytes):
        return hashlib.sha256(source).hexdigest()
    digest = hashlib.sha256()
    with open(source, "rb") as f:
        while piece := f.read(1 << 20):
            digest.update(piece)
    return digest.hexdigest()

__all__ = ["ImageInput", "ModerationResult", "Moderator"]

#: An image to moderate: encoded bytes, a file path, or an already decoded Pillow image.
ImageInput = bytes | str | Path | Image.Image


@dataclass(frozen=True)
class ModerationResult:
    """The outcome for one input: a ``decision``, or an ``error`` when it could not be read.

    ``frame`` is the index (in the file) of the frame to show for the decision: that of the
    most severe category that fired (each category names the frame its score came from: the
    maximum over the ``frames_scored`` sampled frames); 0 for a still image.
    """

    id: str | None
    policy: str
    policy_version: str
    scores_version: str
    model: str
    profile: str = DEFAULT_PROFILE
    decision: Decision | None = None
    error: ImageError | None = None
    frame: int | None = None
    frames_scored: int = 0
    image: dict[str, Any] | None = None
    #: the stored key of each view, in the order of ``embeddings``: a whole frame's index
    #: in the file, ``-1 - k`` for the k-th crop (:mod:`moderation.views`)
    frames: tuple[int, ...] = ()
    #: every view's image embedding, ndarray of shape (len(frames), dim), float32
    #: (not in to_dict)
    embeddings: np.ndarray | None = None
    #: every scored view (frame, time, crop box), in the order of ``frames``
    views: tuple[View, ...] = ()
    #: the upload's SHA-256 and each frame's PDQ (hash banks; ``None``: not hashed)
    hashes: UploadHashes | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def embedding(self) -> np.ndarray | None:
        """The image embedding of ``frame`` (the decided frame), shape (dim,)."""
        if self.embeddings is None or self.frame is None:
            return None
        return self.embeddings[self.frames.index(self.frame)]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "policy": {
                "name": self.policy,
                "version": self.policy_version,
                "scores_version": self.scores_version,
            },
            "model": self.model,
            "profile": self.profile,
        }
        if self.error is not None or self.decision is None:
            code = self.error.code if self.error else "internal"
            message = self.error.message if self.error else "no decision was made"
            out["error"] = {"code": code, "message": message}
            return out
        out.update(
            action=self.decision.action.value,
            flagged=self.decision.flagged,
            triggered=self.decision.triggered,
            frame=self.frame,
            frames_scored=self.frames_scored,
            views_scored=len(self.views) or self.frames_scored,
            image=self.image,
            matches=[m.to_dict() for m in self.decision.matches],
            categories={k: v.to_dict() for k, v in self.decision.categories.items()},
        )
        return out


class Moderator:
    """A policy and an encoder, ready to moderate images.

    The policy's text embeddings are computed once here (from the on-disk cache when
    possible). Calibrated thresholds are refused unless they were fitted with this model.
    """

    def __init__(
        self,
        policy: Policy,
        encoder: ImageTextEncoder,
        cache: VectorCache | None = None,
        *,
        limits: ImageLimits | None = None,
        video_limits: VideoLimits | None = None,
        hashes: bool = True,
    ) -> None:
        accepted = encoder.accepts
        mismatched = {
            cid: model
            for cid, model in policy.calibrated_models().items()
            if model not in accepted
        }
        if mismatched:
            raise ModelMismatchError(
                f"policy {policy.name!r} has thresholds calibrated with another model than "
                f"{encoder.identity!r}: "
                + ", ".join(f"{cid} (calibrated with {m!r})" for cid, m in mismatched.items())
                + ". A threshold on a similarity only holds for the model it was fitted on: "
                "use that model, or calibrate again with this one."
            )
        self.policy = policy
        self.encoder = encoder
        self.cache = cache
        self.limits = limits or ImageLimits()
        self.video_limits = video_limits or VideoLimits()
        #: hash every upload (SHA-256 of its bytes, PDQ of each frame) for hash banks
        self.hashes = hashes
        self.text: PolicyEmbeddings = embed_policy(policy, encoder, cache)

    @classmethod
    def from_policy(
        cls,
        path: str | Path | Policy,
        spec: EncoderSpec | None = None,
        *,
        cache: VectorCache | None = None,
        limits: ImageLimits | None = None,
        video_limits: VideoLimits | None = None,
        hashes: bool = True,
    ) -> Moderator:
        """Load the policy at ``path`` (or take it, parsed) and the model it names, with what
        ``spec`` overrides (an :class:`~moderation.backends.EncoderSpec`: another model or
        weights, the backend, the device, batch size, threads, the cache folder).

        ``cache``: a text-embedding cache a layer above provides (default: the folder cache
        in ``spec.cache_dir``, see :func:`moderation.prompts.default_cache_path`);
        ``limits``: what a decoded image may be (default: :class:`ImageLimits`'s);
        ``video_limits``: what a video may cost (default: :class:`VideoLimits`'s).
        """
        policy = path if isinstance(path, Policy) else load_policy(path)
        spec = EncoderSpec.for_policy(policy, spec)
        encoder = load_encoder(spec)
        if cache is None:
            cache = EmbeddingCache(
                Path(spec.cache_dir) / "embeddings" if spec.cache_dir is not None else None
            )
        return cls(policy, encoder, cache, limits=limits, video_limits=video_limits,
                   hashes=hashes)

    def with_encoder(self, encoder: ImageTextEncoder) -> Moderator:
        """The same policy with another encoder of the same model (e.g. a batching one)."""
        return Moderator(
            self.policy,
            encoder,
            self.cache,
            limits=self.limits,
            video_limits=self.video_limits,
            hashes=self.hashes,
        )

    def with_policy(
        self, policy: Policy, *, proposed: bool = False, max_new_prompts: int | None = None
    ) -> Moderator:
        """A moderator for another policy that shares this one's encoder and cache.

        ``proposed``: the policy is tried, not activated (a dry-run): its prompts are read
        from the cache, but those the cache lacks are encoded into the new moderator's memory
        only (an :class:`~moderation.prompts.OverlayCache`), never into the shared cache.
        ``max_new_prompts``: refuse, with a :class:`PolicyLimitError` and before encoding
        anything, a policy with more prompts than that the cache lacks.
        """
        cache = OverlayCache(self.cache) if proposed else self.cache
        if max_new_prompts is not None:
            missing = missing_prompts(policy, self.encoder.identity, cache)
            if len(missing) > max_new_prompts:
                raise PolicyLimitError(
                    f"policy {excerpt(policy.name)} has {len(missing):,} prompts (terms and "
                    f"exceptions × templates) that were never encoded with "
                    f"{self.encoder.identity}; the limit is {max_new_prompts:,} "
                    f"({PolicyLimits.setting('max_new_prompts')}): propose fewer new terms "
                    "or templates at once, or activate the policy to encode them all"
                )
        return Moderator(
            policy,
            self.encoder,
            cache,
            limits=self.limits,
            video_limits=self.video_limits,
            hashes=self.hashes,
        )

    def scorer(self, profile: str | None = None) -> Scorer:
        """The :class:`~moderation.scorer.Scorer` of this policy (and ``profile``)."""
        return Scorer(self.policy, self.text, profile)

    def embed_text(self, text: str, *, raw: bool = False) -> np.ndarray:
        """A search text as a query vector, shape (1, dim): through the policy's templates
        (a prompt ensemble, as a term is), or as it is (``raw``)."""
        templates = None if raw else self.policy.templates
        return embed_query(text, self.encoder, templates, self.cache)[None]

    def embed_image(self, source: ImageInput) -> np.ndarray:
        """An image as query vectors, one per sampled frame, shape (frames, dim): decoded and
        encoded as an upload is. Raises :class:`ImageError`."""
        decoded = self.decode(source)
        return np.asarray(self.encoder.encode_images(decoded.frames), np.float32)

    def decode(self, source: ImageInput) -> DecodedImage:
        """Decode one input for this moderator's model. Raises :class:`ImageError`."""
        if isinstance(source, Image.Image):
            check_pixels(source.width, source.height, self.limits.max_pixels)
            return DecodedImage(
                [prepare_frame(source, None)],  # a caller's image: not averaged down
                [0],
                1,
                source.format or "PIL",
                source.width,
                source.height,
            )
        if isinstance(source, (str, Path)):
            try:
                with open(source, "rb") as f:
                    head = f.read(64)
            except OSError as e:
                raise ImageError("unreadable",
                                 f"cannot read {source}: {e.strerror or e}") from e
        else:
            head = source[:64]
        if is_video(head):  # sampled frames with their times, and their crops; a path is
            sampling = self.policy.video_views  # streamed, not read whole
            decoded = decode_video(source, limits=self.video_limits, sampling=VideoSampling(
                rate_fps=sampling.rate, max_frames=sampling.max_frames,
                keyframe_snap_s=sampling.keyframe_snap_s),
                draft_size=self.encoder.image_size, crops=self.policy.crop_grid)
            return replace(decoded, sha256=_sha256(source))  # no PDQ of a video's frames
        return decode_image(source, limits=self.limits, draft_size=self.encoder.image_size,
                            crops=self.policy.crop_grid,
                            hasher=pdq_of if self.hashes else None, hash_size=PDQ_MIN_SIDE)

    def moderate(
        self,
        images: Sequence[ImageInput],
        ids: Sequence[str | None] | None = None,
        profile: str | None = None,
        banks: HashMatcher | None = None,
    ) -> list[ModerationResult]:
        """Moderate a batch. Always a list in, a list out, one result per input, in order.

        An input that cannot be decoded gets a result with ``error`` set; the others are
        unaffected. ``profile`` picks a calibration profile of the policy (default: the
        categories' own thresholds); an unknown one raises :class:`PolicyError`.
        """
        self.policy.check_profile(profile)
        decoded: list[DecodedImage | ImageError] = []
        for source in images:
            try:
                decoded.append(self.decode(source))
            except ImageError as e:
                decoded.append(e)
        return self.moderate_decoded(decoded, ids, profile, banks)

    def moderate_decoded(
        self,
        decoded: Sequence[DecodedImage | ImageError],
        ids: Sequence[str | None] | None = None,
        profile: str | None = None,
        banks: HashMatcher | None = None,
    ) -> list[ModerationResult]:
        """Moderate inputs already decoded (or failed) with :meth:`decode`. ``banks``: hash
        banks to match each upload against (:mod:`moderation.banks`): a match joins the
        classifier's decision."""
        if ids is None:
            ids = [None] * len(decoded)
        if len(ids) != len(decoded):
            raise ValueError(f"got {len(decoded)} images but {len(ids)} ids")
        images = [d for d in decoded if isinstance(d, DecodedImage)]
        views = [d.views() for d in images]  # the frames whole, then the crops
        frames = [f for d in images for f in d.view_images()]
        vectors = self.encoder.encode_images(frames) if frames else np.zeros((0, 0), np.float32)
        bounds = np.cumsum([0] + [len(v) for v in views])
        per_image = [vectors[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
        decisions = iter(self.scorer(profile).decide(per_image, views))
        image_views = iter(views)
        version, scores_version = self.policy.version, self.policy.scores_version

        def result(item_id: str | None, **fields: Any) -> ModerationResult:
            return ModerationResult(
                id=item_id,
                policy=self.policy.name,
                policy_version=version,
                scores_version=scores_version,
                model=self.encoder.identity,
                profile=profile or DEFAULT_PROFILE,
                **fields,
            )

        results = []
        embeddings = iter(per_image)
        for item, item_id in zip(decoded, ids, strict=True):
            if isinstance(item, ImageError):
                results.append(result(item_id, error=item))
                continue
            decision, image_vectors, mine = next(decisions), next(embeddings), next(image_views)
            hashes = (UploadHashes(item.sha256, list(item.hashes))
                      if item.sha256 is not None else None)
            if banks is not None and hashes is not None:  # a video: its SHA-256 only
                hashed = item.frame_indices[:len(hashes.frames)]
                decision = with_matches(decision, banks.match(hashes, hashed))
            crops = iter(range(len(mine)))
            results.append(
                result(
                    item_id,
                    decision=decision,
                    frames=tuple(crop_key(next(crops)) if v.is_crop else v.frame
                                 for v in mine),
                    views=tuple(mine),
                    hashes=hashes,
                    embeddings=image_vectors,
                    frame=decision.frame,
                    frames_scored=len(item.frames),
                    image={
                        "format": item.format,
                        "width": item.width,
                        "height": item.height,
                        "frames": item.n_frames,
                    },
                )
            )
        return results

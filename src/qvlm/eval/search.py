"""Text -> image search over a folder with the stage-1 Q-Former (retrieval as a tool).

Patch features go through the on-disk :class:`~qvlm.data.cache.FeatureCache`, so the frozen encoder
runs once per image: a second query over the same folder only runs the (small) Q-Former.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qvlm.data.cache import FeatureCache
from qvlm.data.images import SkipCounter
from qvlm.data.records import IMAGE_EXTENSIONS, Record
from qvlm.errors import QVLMError
from qvlm.eval.evaluate import image_embeddings, iter_feature_batches, text_embeddings

if TYPE_CHECKING:
    from qvlm.models.vlm import QVLM

__all__ = ["expand_image_paths", "SearchHit", "SearchResult", "search_images"]


def expand_image_paths(paths: Sequence[str | Path], recursive: bool = True) -> list[Path]:
    """Paths as given, with each folder replaced by its image files (by extension, sorted).

    Files are kept whatever their extension (a bad one is reported per image later); a missing
    path raises ``QVLMError``; a folder without images raises too, as it is surely a mistake.
    """
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            found = sorted(p for p in path.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise QVLMError(f"{path}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
            out.extend(found)
        elif path.exists():
            out.append(path)
        else:
            raise QVLMError(f"no such file or folder: {path}")
    return out


@dataclass
class SearchHit:
    rank: int  # 1-based
    image: str
    score: float  # cosine similarity of the query with the image's Q-Former embedding

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "image": self.image, "score": self.score}


@dataclass
class SearchResult:
    query: str
    hits: list[SearchHit]
    n_images: int  # images ranked
    skips: SkipCounter = field(default_factory=lambda: SkipCounter("images"))
    encoded: int = 0  # images that went through the vision encoder in this call (0 = all cached)

    def to_dict(self) -> dict[str, Any]:
        return {"query": self.query, "n_images": self.n_images, "encoded": self.encoded,
                "skipped": sum(self.skips.skipped.values()), "hits": [h.to_dict() for h in self.hits]}


@torch.no_grad()
def search_images(
    model: QVLM,
    images: Sequence[str | Path],
    query: str,
    cache_dir: str | Path,
    top_k: int = 5,
    batch_size: int = 32,
) -> SearchResult:
    """Rank image files by ITC similarity to ``query``; return the ``top_k`` best (highest first).

    Args:
        images: image file paths (see :func:`expand_image_paths` for folders).
        cache_dir: FeatureCache root (features are written there and reused).
    Unreadable images are skipped and counted in ``result.skips``.
    """
    if not query.strip():
        raise QVLMError("the search text is empty")
    records = [Record(key=str(p), image_path=str(Path(p).resolve())) for p in images]
    cache = FeatureCache(cache_dir, encoder=model.vision)
    misses_before = cache.misses
    skips = SkipCounter("images")
    kept: list[Record] = []
    embeds: list[torch.Tensor] = []
    for batch, feats in iter_feature_batches(model, records, batch_size, skips, cache, desc="search"):
        kept.extend(batch)
        embeds.append(image_embeddings(model, feats))
    if not kept:
        raise QVLMError(f"no readable images to search ({skips.summary()})")
    scores = model.qformer.similarity(torch.cat(embeds), text_embeddings(model, [query]))[:, 0]  # [Ni]
    order = torch.argsort(scores.float(), descending=True, stable=True)[:top_k].tolist()
    hits = [SearchHit(rank=n + 1, image=kept[i].key, score=float(scores[i])) for n, i in enumerate(order)]
    return SearchResult(query=query, hits=hits, n_images=len(kept), skips=skips,
                        encoded=cache.misses - misses_before)

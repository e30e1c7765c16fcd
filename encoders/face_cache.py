"""A bounded LRU cache of per-photo face results, so re-running a workflow does not detect and
embed the same photos again.

Host-free (numpy, encoders/faces.py). Keyed by the photo's content, the recognizer and the detection
settings: another analyzer, selection or crop size is another entry.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
from collections import OrderedDict

import numpy as np

from .faces import DetectedFace, FaceAnalyzer, detect_and_embed, to_rgb_uint8


class FaceCache:
    """A bounded LRU of detect_and_embed results, keyed by (photo content hash, recognizer hash,
    detection settings). Thread-safe; holds at most `max_entries` photos' results."""

    def __init__(self, max_entries: int = 64):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, tuple[DetectedFace, ...]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(analyzer: FaceAnalyzer, pixels: np.ndarray, select: str, index: int, crop_size: int) -> tuple:
        digest = hashlib.sha256()
        digest.update(repr(pixels.shape).encode())
        digest.update(pixels.tobytes())
        detector_file = os.path.abspath(str(getattr(analyzer.detector, "model_file", id(analyzer.detector))))
        return (
            digest.hexdigest(),
            analyzer.recognizer_id.sha256_16,
            analyzer.recognizer_id.embedding_dim,
            detector_file,
            tuple(analyzer.det_size),
            float(analyzer.det_thresh),
            select,
            int(index) if select == "index" else 0,
            int(crop_size),
        )

    def get(self, key):
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return found

    def put(self, key, faces: tuple[DetectedFace, ...]) -> None:
        with self._lock:
            self._entries[key] = faces
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)


FACE_CACHE = FaceCache()


def cached_detect_and_embed(analyzer: FaceAnalyzer, image, *, image_index: int = 0, select: str = "largest",
                            index: int = 0, crop_size: int, cache: FaceCache | None = FACE_CACHE):
    """detect_and_embed through `cache` (None: no cache). Faces come back numbered `image_index`."""
    if cache is None:
        return detect_and_embed(analyzer, image, image_index=image_index, select=select, index=index, crop_size=crop_size)
    rgb = to_rgb_uint8(image)  # the key hashes these bytes; channel order is fixed, so RGB serves
    key = cache.key(analyzer, rgb, select, index, crop_size)
    found = cache.get(key)
    if found is None:
        found = detect_and_embed(analyzer, rgb, image_index=image_index, select=select, index=index, crop_size=crop_size)
        cache.put(key, found)
    return tuple(f if f.image_index == image_index else dataclasses.replace(f, image_index=image_index) for f in found)

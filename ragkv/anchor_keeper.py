"""Which anchor passage a facade's engine precomputes and reads chunks after, and when to read
the cache's recorded one again (``precompute_context="anchor"`` with ``anchor_source=
"corpus"``); the passages themselves are in :mod:`ragkv.anchor`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError

from ragkv.anchor import ANCHOR_SETTING, corpus_anchor

if TYPE_CHECKING:
    from ragkv.cache_index import CacheIndex
    from ragkv.config import RagkvConfig
    from ragkv.engine.base import Backend

log = logging.getLogger("ragkv")


class AnchorKeeper:
    """The corpus passage one facade's engine holds.

    Until it holds the cache's passage (or picked its own), each query and precompute asks
    the index again, so a process opened before the cache's first ingestion adopts the
    passage another process records. Once held, the passage is read again when the corpus
    version has changed (a cache emptied of documents forgets its passage, and its next
    ingestion records another); never a passage of its own (the benchmark's)."""

    def __init__(self, config: RagkvConfig, index: CacheIndex, backend: Backend) -> None:
        self.config, self.index, self.backend = config, index, backend
        self.settled = False
        self.version: str | None = None  # the corpus version the held passage was read at
        self.own = False
        if self.from_corpus:
            version = self._corpus_version()
            if recorded := self._recorded():
                self._use(recorded, version)

    @property
    def from_corpus(self) -> bool:
        return self.config.anchor_text is None and self.config.anchor_source == "corpus"

    @property
    def active(self) -> bool:
        return self.from_corpus and self.config.precompute_context == "anchor"

    def choose(self, texts: Sequence[str], record: bool = True) -> str | None:
        """``RagKV.choose_anchor``: the recorded passage, else one picked from ``texts`` and
        recorded (``record=False``: picked, recorded nowhere, held for good)."""
        if not self.active:
            return None
        version = self._corpus_version() if record else None
        chosen = self._recorded() if record else None
        if chosen is None:
            chosen = corpus_anchor(texts, self.backend.tokenizer)
            if chosen is None:  # too short a corpus: the engine's own passage, as a facade
                if record:  # opened now holds (not one the cache has since forgotten)
                    self._use(self.config.resolved_anchor_text, version)
                    self.settled = False
                return None
            if record:
                try:
                    chosen = self.index.record_setting(ANCHOR_SETTING, chosen)
                except SQLAlchemyError as exc:  # unrecorded, another process could not find it
                    log.warning("could not record the corpus anchor: %s", exc)
                    return None
        self._use(chosen, version, own=not record)
        return chosen

    def adopt(self) -> None:
        """Before a query or a precompute: adopt the passage another process recorded since
        this facade read it (its chunks would otherwise be keyed, missed and computed again
        after another passage). One indexed read per call; two when the corpus changed, or
        until a passage is recorded."""
        if not self.active or self.own:
            return
        try:
            version = self.index.corpus_version()
        except SQLAlchemyError:  # answered as without a cache; the passage held stays
            return
        if self.settled and version == self.version:
            return
        try:
            recorded = self.index.setting(ANCHOR_SETTING)
        except SQLAlchemyError:  # as above: the passage held stays
            return
        if recorded is not None:
            self._use(recorded, version)
        else:  # none recorded (yet, or no more: a cache emptied of documents forgets it): the
            # engine's own passage, as a facade opened now holds; read again at the next call
            self._use(self.config.resolved_anchor_text, version)
            self.settled = False

    def _use(self, text: str, version: str | None, own: bool = False) -> None:
        """Hand the engine ``text`` unless it has it already: ingestion asks once per
        document, and a new passage drops the engine's cached KV of the old one."""
        self.settled, self.version, self.own = True, version, own
        if self.backend.template.anchor_ids(text) != self.backend.keys.anchor_ids:
            self.backend.use_anchor(text)

    def _corpus_version(self) -> str | None:
        try:
            return self.index.corpus_version()
        except SQLAlchemyError as exc:
            log.debug("cache index unreachable, corpus version not read: %s", exc)
            return None

    def _recorded(self) -> str | None:
        """The cache's corpus anchor; None (the engine's passage) when the index cannot say:
        an unreachable index must not stop a query (it is answered as without a cache)."""
        try:
            return self.index.setting(ANCHOR_SETTING)
        except SQLAlchemyError as exc:
            log.warning("cache index unreachable, anchor passage not read: %s", exc)
            return None

"""Text in, text out: prompts through a tokenizer, streamed pieces, stop strings.

Stop strings are matched on decoded text, not on ids, because the same string can be
tokenized many ways. The device decodes in chunks (growing from 1 to `MAX_CHUNK` steps,
so the first words appear at once); between chunks the host decodes what is new, cuts a
row at the first stop string (the string itself is not returned) and ends that row on
the device. Streamed text holds back a tail that could still become a stop string or is
an incomplete UTF-8 sequence.
"""

from __future__ import annotations

from typing import Callable, Sequence

from gptjax.config import ModelConfig
from gptjax.data.tokenizer import Tokenizer
from gptjax.generation.decoder import Decoder
from gptjax.generation.sampling import Sampling

MAX_CHUNK = 16
INCOMPLETE = "\ufffd"  # what a decoder shows for a UTF-8 sequence cut mid-character


class TextRow:
    """One row's text so far: cut at the first stop string, streamed without a tail that
    could still become one."""

    def __init__(self, stops: Sequence[str]):
        self.ids: list[int] = []
        self.text = ""
        self.shown = 0  # characters already streamed
        self.stopped = False  # a stop string was found
        self.ended = False  # ...and the device was told
        self._stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1

    def extend(self, ids: list[int], decode) -> None:
        self.ids += ids
        self.text = decode(self.ids)
        cuts = [i for i in (self.text.find(s) for s in self._stops) if i >= 0]
        if cuts:
            self.text, self.stopped = self.text[:min(cuts)], True

    def unshown(self, final: bool) -> str:
        """Text safe to show now: not a possible stop-string prefix, not a cut character."""
        end = len(self.text)
        if not final:
            # A cut character first: once complete, it may finish a stop string.
            while end > self.shown and self.text[end - 1] == INCOMPLETE:
                end -= 1
            end -= self._hold
        piece = self.text[self.shown:max(end, self.shown)]
        self.shown += len(piece)
        return piece


def generate_text(params, config: ModelConfig, tokenizer: Tokenizer,
                  prompts: Sequence[str | Sequence[int]],
                  max_new_tokens: int, sampling: Sampling = Sampling(), *,
                  stop: Sequence[str] = (), on_text: Callable[[int, str], None] | None = None,
                  stop_at_eot: bool = True) -> list[str]:
    """Continuations of `prompts` (text, or ids already encoded; without the prompts), cut at
    the first stop string.

    `on_text(row, piece)` receives text as it is generated (streaming). Ids beyond the
    tokenizer's vocabulary (a padded model) are never sampled.
    """
    stops = [s for s in stop if s]
    ids = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    decoder = Decoder(params, config, ids, max_new_tokens, sampling,
                      valid_vocab=tokenizer.vocab_size, eot_id=tokenizer.eot_id,
                      stop_at_eot=stop_at_eot)
    rows = [TextRow(stops) for _ in prompts]
    eot = tokenizer.eot_id if stop_at_eot else None

    def decode(ids):
        return tokenizer.decode(ids[:-1] if ids and ids[-1] == eot else ids)

    chunked = bool(stops) or on_text is not None
    chunk = 1
    while True:
        new = decoder.advance(chunk if chunked else None)
        for i, (row, ids) in enumerate(zip(rows, new)):
            if ids and not row.stopped:
                row.extend(ids, decode)
        newly_stopped = [i for i, r in enumerate(rows) if r.stopped and not r.ended]
        decoder.stop_rows(newly_stopped)
        for i in newly_stopped:
            rows[i].ended = True
        finished = decoder.finished
        if on_text is not None:
            for i, row in enumerate(rows):
                piece = row.unshown(final=finished or row.stopped)
                if piece:
                    on_text(i, piece)
        if finished:
            return [r.text for r in rows]
        chunk = min(2 * chunk, MAX_CHUNK)


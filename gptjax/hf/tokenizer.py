"""GPT-2's tokenizer as transformers' files (vocab.json, merges.txt), from tiktoken's ranks.

tiktoken stores one rank per byte string; transformers' byte-level BPE wants the tokens
spelled in GPT-2's printable byte alphabet plus the ordered list of merges. A token of
rank r was made by the merge that BPE restricted to ranks below r would do last, so
re-running BPE on its bytes with those ranks must leave exactly the two merged parts.
"""

from __future__ import annotations

import json
from pathlib import Path

from gptjax.data.tokenizer import EOT_TEXT, GPT2Tokenizer
from gptjax.errors import GptjaxError


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> character map: printable Latin-1 stays, the rest shifts to 256+."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    for n, b in enumerate(shifted):
        table[b] = chr(256 + n)
    return dict(sorted(table.items()))


def merge_parts(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two parts whose merge made `token`: BPE over its bytes with lower ranks only."""
    limit = ranks[token]
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        pairs = [(ranks.get(a + b, limit), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank >= limit:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise GptjaxError(f"BPE token {token!r} (rank {limit}) is not one merge of lower-ranked "
                          "tokens; these ranks cannot be written as merges.txt")
    return parts[0], parts[1]


def vocab_and_merges(token_bytes: list[bytes]) -> tuple[dict[str, int], list[str]]:
    """vocab.json's {token text: id} (end-of-text last) and merges.txt's lines in rank order."""
    alphabet = bytes_to_unicode()

    def spell(b: bytes) -> str:
        return "".join(alphabet[x] for x in b)

    ranks = {b: i for i, b in enumerate(token_bytes)}
    vocab = {spell(b): i for i, b in enumerate(token_bytes)}
    vocab[EOT_TEXT] = len(token_bytes)
    merges = []
    for token in token_bytes:
        if len(token) > 1:
            a, b = merge_parts(token, ranks)
            merges.append(f"{spell(a)} {spell(b)}")
    return vocab, merges


def save_tokenizer(tokenizer: GPT2Tokenizer, out_dir: Path, *, model_max_length: int = 1024) -> list[Path]:
    """Write vocab.json, merges.txt and tokenizer_config.json for GPT2Tokenizer(Fast)."""
    vocab, merges = vocab_and_merges(tokenizer.token_bytes())
    out = Path(out_dir)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": model_max_length,
        "bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT,
        # Decode exactly as tiktoken does: no space before a word, no "clean up" of spaces.
        "add_prefix_space": False,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return [out / n for n in ("vocab.json", "merges.txt", "tokenizer_config.json")]

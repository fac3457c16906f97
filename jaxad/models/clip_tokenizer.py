"""OpenAI CLIP's byte-level BPE tokenizer, without ftfy or regex.

Source: OpenAI's `clip/simple_tokenizer.py` (`SimpleTokenizer`,
`bytes_to_unicode`, `basic_clean`, `whitespace_clean`) and `clip/clip.py`
(`tokenize`), MIT License, Copyright (c) 2021 OpenAI. The merge list ships in
`jaxad/assets/clip_bpe/` with that notice. Vocabulary: 256 byte symbols,
the same with `</w>`, 48 894 merges, `<|startoftext|>` = 49406 and
`<|endoftext|>` = 49407 (49 408 ids).

Differences from the original, none of which changes clean text (the
golden cases and every PPAD prompt are reproduced exactly):
* ftfy is not a dependency. `basic_clean` does the deterministic part of
  `ftfy.fix_text`'s defaults: terminal escapes and control characters
  removed, Latin ligatures split, full-/half-width forms and U+3000 made
  standard width, curly quotes straightened, NFC. ftfy's heuristic repair
  of mojibake (text decoded with the wrong codec) is not reproduced.
* The `regex` module's \\p{L} / \\p{N} are character classes built from
  `unicodedata` categories (L*, N*) for the stdlib `re`, so they follow
  Python's Unicode version rather than regex's.

  ids = tokenize(["a photo of a normal chest x-ray"])  # int32 [1, 77]
"""

import functools
import gzip
import html
import pathlib
import re
import unicodedata
from collections.abc import Sequence

import numpy as np

BPE_PATH = (
  pathlib.Path(__file__).resolve().parents[1]
  / "assets"
  / "clip_bpe"
  / "bpe_simple_vocab_16e6.txt.gz"
)
SOT, EOT = 49406, 49407
CONTEXT_LENGTH = 77
_N_MERGES = 49152 - 256 - 2  # lines 1.. of the merge file that are used


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
  """OpenAI's reversible byte -> printable character map (256 entries):
  printable Latin-1 bytes map to themselves, the others to U+0100 up."""
  bs = [
    *range(ord("!"), ord("~") + 1),
    *range(ord("¡"), ord("¬") + 1),
    *range(ord("®"), ord("ÿ") + 1),
  ]
  cs = list(bs)
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs), strict=True))


def _classes() -> tuple[str, str]:
  """`re` character-class bodies of \\p{L} and \\p{N}: every code point
  whose Unicode general category is L* (letters) / N* (numbers)."""
  spans = {"L": [], "N": []}
  for c in range(0x110000):
    kind = spans.get(unicodedata.category(chr(c))[0])
    if kind is None:
      continue
    if kind and kind[-1][1] == c - 1:
      kind[-1][1] = c
    else:
      kind.append([c, c])
  return tuple(
    "".join(
      f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in spans[k]
    )
    for k in "LN"
  )


@functools.cache
def _pattern() -> re.Pattern:
  """OpenAI's `self.pat` with \\p{L}, \\p{N} spelled out for `re`."""
  letters, numbers = _classes()
  return re.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
    rf"|[{letters}]+|[{numbers}]|[^\s{letters}{numbers}]+",
    re.IGNORECASE,
  )


# ftfy.fix_text's deterministic defaults (see the module docstring).
_TERMINAL_ESCAPES = re.compile("\033\\[((?:\\d|;)*)([a-zA-Z])")
_CONTROL = dict.fromkeys(
  [
    *range(0x00, 0x09),
    0x0B,
    *range(0x0E, 0x20),
    0x7F,
    *range(0x206A, 0x2070),
    0xFEFF,
    *range(0xFFF9, 0xFFFD),
    *range(0x1D173, 0x1D17B),
    *range(0xE0000, 0xE0080),
  ]
)
_LIGATURES = {
  ord(k): v
  for k, v in zip(
    "Ĳĳﬀﬁﬂﬃﬄﬅﬆ",
    ["IJ", "ij", "ff", "fi", "fl", "ffi", "ffl", "ſt", "st"],
    strict=True,
  )
}
_WIDTH = {0x3000: " "} | {
  c: unicodedata.normalize("NFKC", chr(c))
  for c in range(0xFF01, 0xFFF0)
  if unicodedata.normalize("NFKC", chr(c)) != chr(c)
}
_QUOTES = {c: "'" for c in range(0x2018, 0x201C)} | {
  c: '"' for c in range(0x201C, 0x2020)
}


def basic_clean(text: str) -> str:
  """ftfy-like fixes (module docstring), then `html.unescape` twice and
  strip, as OpenAI's `basic_clean`."""
  text = _TERMINAL_ESCAPES.sub("", text)
  text = text.translate(_LIGATURES).translate(_WIDTH).translate(_QUOTES)
  text = unicodedata.normalize("NFC", text.translate(_CONTROL))
  return html.unescape(html.unescape(text)).strip()


def whitespace_clean(text: str) -> str:
  """Runs of whitespace become one space; stripped."""
  return re.sub(r"\s+", " ", text).strip()


def _pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
  return set(zip(word, word[1:], strict=False))


class SimpleTokenizer:
  """OpenAI's `SimpleTokenizer` (encode / decode, no special tokens added).

  Attributes:
    encoder: {BPE symbol: id}; decoder its inverse.
    bpe_ranks: {(left, right): merge priority}.
  """

  def __init__(self, bpe_path: str | pathlib.Path = BPE_PATH):
    self.byte_encoder = bytes_to_unicode()
    self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
    with gzip.open(bpe_path) as f:
      lines = f.read().decode("utf-8").split("\n")[1 : _N_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    vocab = list(self.byte_encoder.values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    self.encoder = {v: i for i, v in enumerate(vocab)}
    self.decoder = dict(enumerate(vocab))
    self.bpe_ranks = {m: i for i, m in enumerate(merges)}
    self.cache = {s: s for s in ("<|startoftext|>", "<|endoftext|>")}
    self.pat = _pattern()

  def bpe(self, token: str) -> str:
    """Space-separated BPE symbols of one pre-token (byte-mapped)."""
    if token in self.cache:
      return self.cache[token]
    word = (*token[:-1], token[-1] + "</w>")
    pairs = _pairs(word)
    if not pairs:
      return token + "</w>"
    inf = float("inf")
    while True:
      bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, inf))
      if bigram not in self.bpe_ranks:
        break
      first, second = bigram
      merged, i = [], 0
      while i < len(word):
        try:
          j = word.index(first, i)
        except ValueError:
          merged.extend(word[i:])
          break
        merged.extend(word[i:j])
        i = j
        if i < len(word) - 1 and word[i + 1] == second:
          merged.append(first + second)
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = tuple(merged)
      if len(word) == 1:
        break
      pairs = _pairs(word)
    out = " ".join(word)
    self.cache[token] = out
    return out

  def encode(self, text: str) -> list[int]:
    """BPE ids of `text` (cleaned, lower-cased), without SOT / EOT."""
    ids = []
    text = whitespace_clean(basic_clean(text)).lower()
    for token in self.pat.findall(text):
      token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
      ids.extend(self.encoder[s] for s in self.bpe(token).split(" "))
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    """Text of BPE ids (`</w>` becomes a space), as OpenAI's `decode`."""
    text = "".join(self.decoder[int(i)] for i in ids)
    raw = bytearray(self.byte_decoder[c] for c in text)
    return raw.decode("utf-8", errors="replace").replace("</w>", " ")


@functools.cache
def default_tokenizer() -> SimpleTokenizer:
  """The tokenizer of the packaged merge list (built once, ~1 s)."""
  return SimpleTokenizer()


def tokenize(
  texts: str | Sequence[str],
  context_length: int = CONTEXT_LENGTH,
  *,
  truncate: bool = False,
  tokenizer: SimpleTokenizer | None = None,
) -> np.ndarray:
  """Token ids as OpenAI's `clip.tokenize`.

  Args:
    texts: one string or a sequence of N strings.
    context_length: row length (77 for every CLIP).
    truncate: cut a too-long text to context_length, ending it with EOT,
      instead of raising.
    tokenizer: default `default_tokenizer()`.

  Returns:
    [N, context_length] int32: SOT, the BPE ids, EOT, then 0 padding.

  Raises:
    RuntimeError: a text longer than context_length (with SOT and EOT) and
      truncate False; the message names the text (OpenAI's error).
  """
  if isinstance(texts, str):
    texts = [texts]
  tok = tokenizer or default_tokenizer()
  out = np.zeros((len(texts), context_length), np.int32)
  for i, text in enumerate(texts):
    ids = [SOT, *tok.encode(text), EOT]
    if len(ids) > context_length:
      if not truncate:
        raise RuntimeError(
          f"Input {text} is too long for context length {context_length}"
        )
      ids = ids[:context_length]
      ids[-1] = EOT
    out[i, : len(ids)] = ids
  return out

"""The real CLIP BPE tokenizer (49408 tokens), built offline from the vocabulary
file that open_clip's wheel ships: SD's tokenizer without a hub."""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
from functools import lru_cache
from pathlib import Path


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_bpe_vocab_path() -> Path:
    spec = importlib.util.find_spec("open_clip")  # locates the wheel without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the CLIP BPE vocabulary comes from open_clip's wheel: `pip install --no-deps open-clip-torch`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the open_clip install; reinstall open-clip-torch")
    return path


def write_clip_tokenizer_files(out_dir: str | Path) -> Path:
    """Write vocab.json / merges.txt identical to openai/clip-vit-large-patch14's."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(clip_bpe_vocab_path()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return out_dir


@lru_cache(maxsize=None)
def clip_tokenizer(max_length: int = 77):
    """CLIPTokenizer with the real BPE vocabulary (49408 tokens), offline."""
    from transformers import CLIPTokenizer

    cache = Path(os.environ.get("QLIP_CACHE", Path.home() / ".cache" / "qlip")) / "clip-tokenizer"
    if not (cache / "merges.txt").is_file():
        write_clip_tokenizer_files(cache)
    return CLIPTokenizer(
        str(cache / "vocab.json"), str(cache / "merges.txt"), model_max_length=max_length,
        bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>",
    )

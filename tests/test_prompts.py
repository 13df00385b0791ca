"""Prompt sources (every format, the real files on ../shared/data), normalization,
stable-hash splits, the cached DataModule, and the clear errors."""
import json

import pytest

from data.prompts import (
    BUILTIN,
    EmptySplitError,
    PromptDataModule,
    PromptSourceError,
    assign_splits,
    count_truncated,
    load_prompts,
    normalize,
    parse_spec,
    prompt_seed,
    read_source,
    stable_unit,
)
from data.tokenizer import clip_tokenizer


# ---------------------------------------------------------------------------
# the real files (skipped without ../shared/data)
# ---------------------------------------------------------------------------
def test_coco_captions_json(shared_data):
    full = read_source(f"coco:{shared_data / 'coco' / 'captions_val2017.json'}")
    assert len(full) == 25014 and all(isinstance(c, str) for c in full[:100])
    mini = read_source(str(shared_data / "coco-mini" / "captions.json"))  # bare .json: recognized as COCO
    assert len(mini) == 160 and mini[0].startswith("A plane floating")
    kept, stats = normalize(full)
    assert stats.n_duplicates > 0 and stats.n_kept == len(kept) == len(set(kept))
    assert all(c == c.strip() and "  " not in c for c in kept)


def test_conceptual_captions_tsv(shared_data):
    path = shared_data / "cc" / "Validation_GCC-1.1.0-Validation.head3000.tsv"
    assert parse_spec(str(path))[0] == "cc"
    caps = read_source(f"cc:{path}")
    assert len(caps) == 3000 and caps[1] == "an angler fishes river on a snowy day ."
    assert not any(c.startswith("http") for c in caps)


def test_parti_prompts_tsv(shared_data):
    path = shared_data / "parti" / "PartiPrompts.tsv"
    assert parse_spec(str(path))[0] == "parti"
    prompts = read_source(f"parti:{path}")
    assert len(prompts) == 1632 and prompts[:2] == ["bond", "element"]
    kept, stats = normalize(prompts)
    count_truncated(kept, clip_tokenizer(), stats)
    assert stats.max_tokens == 77 and stats.n_truncated >= 1  # PartiPrompts has paragraph-long prompts
    assert all(len(clip_tokenizer()(p).input_ids) > 77 for p in stats.truncated_examples)


def test_real_sources_split_into_the_run_dir(shared_data, tmp_path):
    dm = PromptDataModule(f"parti:{shared_data / 'parti' / 'PartiPrompts.tsv'}", tmp_path, limit=500)
    dm.prepare_data()
    dm.setup()
    sizes = {s: len(dm.split(s)) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == 500 and 330 < sizes["train"] < 470  # ~80%
    meta = json.loads((tmp_path / "prompts" / "meta.json").read_text())
    assert meta["counts"] == sizes and meta["settings"]["limit"] == 500
    assert (tmp_path / "prompts" / "val.txt").read_text().splitlines() == dm.split("val")


# ---------------------------------------------------------------------------
# every format, on small files
# ---------------------------------------------------------------------------
def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_plain_text_and_jsonl(tmp_path):
    assert read_source(write(tmp_path, "p.txt", "a cat\n\n  a dog \n")) == ["a cat", "", "  a dog "]
    assert read_source(write(tmp_path, "p.jsonl", '{"prompt": "x"}\n\n{"prompt": "y", "n": 1}\n')) == ["x", "y"]


def test_sd_prompts_local_files_and_name(tmp_path, monkeypatch):
    import pandas as pd

    df = pd.DataFrame({"Prompt": ["a castle, highly detailed", "portrait of a cat"]})
    df.to_csv(tmp_path / "sd.csv", index=False)
    df.to_parquet(tmp_path / "sd.parquet")
    for f in ("sd.csv", "sd.parquet"):
        assert read_source(f"sd-prompts:{tmp_path / f}") == list(df.Prompt)
    txt = write(tmp_path, "sd.txt", "one\ntwo\n")
    assert read_source(f"sd-prompts:{txt}") == ["one", "two"]

    class FakeSplit:  # what datasets.load_dataset returns for the hub name, without the network
        column_names = ["Prompt"]

        def __getitem__(self, column):
            return ["hub prompt 1", "hub prompt 2"]

    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name: calls.append(name) or {"train": FakeSplit()})
    assert read_source("sd-prompts") == ["hub prompt 1", "hub prompt 2"]
    assert calls == ["Gustavosta/Stable-Diffusion-Prompts"]

    class FakeCoco:  # hub COCO caption sets often hold several captions per image
        column_names = ["image_id", "captions"]

        def __getitem__(self, column):
            return [["a cat", "a small cat"], ["a dog"]]

    monkeypatch.setattr(datasets, "load_dataset", lambda name: {"validation": FakeCoco()})
    assert read_source("coco:someone/coco-captions") == ["a cat", "a small cat", "a dog"]
    with pytest.raises(PromptSourceError, match="coco needs a captions file or a dataset name"):
        read_source("coco")


def test_unreachable_hub_dataset_is_named(monkeypatch):
    import datasets

    def offline(name):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(PromptSourceError, match="Gustavosta/Stable-Diffusion-Prompts.*local file"):
        read_source("sd-prompts")


def test_world_prompts_are_the_scene_captions():
    from data.world import make_scene

    assert read_source("world:val", n_world=20, seed=3) == [make_scene(3, "val", i).caption for i in range(20)]
    assert read_source("builtin") == BUILTIN


# ---------------------------------------------------------------------------
# normalization, hashing, splits
# ---------------------------------------------------------------------------
def test_normalize_strips_dedupes_and_drops_empty():
    kept, stats = normalize(["  a  red\tcircle ", "a red circle", "", "   ", "b"])
    assert kept == ["a red circle", "b"]
    assert (stats.n_raw, stats.n_empty, stats.n_duplicates, stats.n_kept) == (5, 2, 1, 2)


def test_truncation_is_counted_at_the_tokenizer_length():
    long = " ".join(["word"] * 100)
    _, stats = normalize(["short", long])
    count_truncated(["short", long], clip_tokenizer(), stats)
    assert stats.n_truncated == 1 and stats.truncated_examples == [long]


def test_splits_are_stable_and_independent_of_the_other_prompts():
    prompts = [f"prompt number {i}" for i in range(2000)]
    a = assign_splits(prompts)
    b = assign_splits(list(reversed(prompts))[:1500] + ["a new prompt"])
    for split in ("train", "val", "test"):
        assert set(a[split]) & set(b["train"] + b["val"] + b["test"]) <= set(b[split])
    assert 1500 < len(a["train"]) < 1700 and 130 < len(a["val"]) < 270
    assert stable_unit("x", "s") == stable_unit("x", "s") != stable_unit("x", "t")
    assert prompt_seed("a red circle", 0) == prompt_seed("a red circle", 0) != prompt_seed("a red circle", 1)


def test_limit_keeps_a_stable_subset_in_proportion():
    prompts = [f"p{i}" for i in range(3000)]
    small = assign_splits(prompts, limit=1000)
    assert sum(len(v) for v in small.values()) == 1000
    big = assign_splits(prompts + [f"q{i}" for i in range(10)], limit=1000)
    assert sum(len(set(small[s]) & set(big[s])) for s in small) >= 990  # 10 new prompts move at most 10
    assert 700 < len(small["train"]) < 900


def test_load_prompts_keeps_its_old_behaviour(tmp_path):
    assert load_prompts("builtin", 3) == BUILTIN[:3]
    assert len(load_prompts("world", limit=16, split="val")) <= 16
    assert load_prompts(write(tmp_path, "p.txt", "a\n a \nb\n")) == ["a", "b"]


# ---------------------------------------------------------------------------
# the DataModule and its cache
# ---------------------------------------------------------------------------
def test_datamodule_caches_splits_and_serves_loaders(tmp_path):
    dm = PromptDataModule("world", tmp_path, limit=200, batch_size=4, predict_splits=["train", "val"], shard_size=16)
    dm.prepare_data()
    dm.setup()
    again = PromptDataModule("world", tmp_path, limit=200)
    again.prepare_data()  # the same settings: reused, not rebuilt
    again.setup()
    assert again.splits == dm.splits
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, list) and len(batch) == 4 and all(isinstance(p, str) for p in batch)
    shards = dm.generation_shards()
    assert sum(len(s["prompts"]) for s in shards) == len(dm.split("train")) + len(dm.split("val"))
    assert all(s["seeds"] == [prompt_seed(p) for p in s["prompts"]] for s in shards)
    with pytest.raises(FileExistsError, match="other settings.*limit: cached 200 vs now 100.*--overwrite true"):
        PromptDataModule("world", tmp_path, limit=100).prepare_data()
    PromptDataModule("world", tmp_path, limit=100, overwrite=True).prepare_data()
    assert json.loads((tmp_path / "prompts" / "meta.json").read_text())["settings"]["limit"] == 100


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------
def test_empty_split_after_filtering_is_named(tmp_path):
    dm = PromptDataModule(write(tmp_path, "p.txt", "only one prompt\n\n  \nonly one prompt\n"), tmp_path / "run")
    dm.prepare_data()
    empty = next(s for s in ("train", "val", "test") if not dm.splits[s])
    with pytest.raises(EmptySplitError, match=f"split '{empty}'.*empty after filtering.*1 prompts in all.*--limit"):
        dm.split(empty)


@pytest.mark.parametrize("name,text,message", [
    ("p.xml", "<a/>", "unknown format '.xml'.*use .txt, .jsonl"),
    ("p.json", '{"images": []}', "unknown JSON layout.*no 'annotations'"),
    ("p.tsv", "a\tb\tc\n", "unknown TSV layout.*prefix the path with parti: or cc:"),
])
def test_unknown_formats_are_named(tmp_path, name, text, message):
    with pytest.raises(PromptSourceError, match=message):
        read_source(write(tmp_path, name, text))


@pytest.mark.parametrize("spec,text,message", [
    ("parti:{}", "Text\tCategory\nbond\tAbstract\n", "no 'Prompt' column.*columns: \\['Text', 'Category'\\]"),
    ("sd-prompts:{}", "text2,x\na,b\n", "no 'Prompt' column"),
    ("jsonl:{}", '{"text": "a"}\n', "line 1 has no 'prompt' column"),
    ("coco:{}", '{"annotations": [{"image_id": 1}]}', "no 'caption' column"),
])
def test_missing_columns_are_named(tmp_path, spec, text, message):
    suffix = {"parti": ".tsv", "sd-prompts": ".csv", "jsonl": ".jsonl", "coco": ".json"}[spec.split(":")[0]]
    path = write(tmp_path, "bad" + suffix, text)
    with pytest.raises(PromptSourceError, match=message):
        read_source(spec.format(path))


def test_missing_file_and_bad_fractions():
    with pytest.raises(FileNotFoundError, match="missing.txt does not exist"):
        read_source("missing.txt")
    with pytest.raises(ValueError, match="summing to 1"):
        assign_splits(["a"], fractions=(0.5, 0.1, 0.1))

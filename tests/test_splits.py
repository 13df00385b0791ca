"""One prompt-source syntax in every stage, with disjoint hashed train / val / test splits
(data.prompts.draw_prompts), and the embedded world's own scene split unchanged."""
import hashlib
import json
import random

import pytest

from data.prompts import (
    SYNTAX,
    EmptySplitError,
    PromptDataModule,
    PromptSourceError,
    draw_prompts,
    load_prompts,
    normalize,
    read_source,
)


def sha1_split(prompt: str, fractions=(0.8, 0.1, 0.1), salt: str = "qlip") -> str:
    """The split a prompt belongs to, recomputed here from the definition (SHA-1 of salt:split NUL prompt)."""
    u = int(hashlib.sha1(f"{salt}:split\0{prompt}".encode()).hexdigest()[:15], 16) / 16 ** 15
    return "train" if u < fractions[0] else "val" if u < fractions[0] + fractions[1] else "test"


def fingerprint(prompts) -> str:
    return hashlib.sha1("\n".join(prompts).encode()).hexdigest()[:16]


@pytest.fixture()
def prompt_files(tmp_path):
    """The same 400 prompts (plus blanks and a duplicate) as .txt, as shuffled .txt and as .jsonl."""
    prompts = [f"a photo of {k} {colour} objects on a table" for k in range(100)
               for colour in ("red", "blue", "green", "white")]
    rows = prompts + ["", "  ", prompts[3]]
    txt = tmp_path / "p.txt"
    txt.write_text("\n".join(rows) + "\n")
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    txt2 = tmp_path / "shuffled.txt"
    txt2.write_text("\n".join(shuffled) + "\n")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows))
    return prompts, txt, txt2, jsonl


def check_splits(source: str, prompts: list[str], fractions=(0.8, 0.1, 0.1)):
    draws = {s: draw_prompts(source, s, fractions=fractions) for s in ("train", "val", "test")}
    sets = {s: set(d.prompts) for s, d in draws.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert sets["train"] | sets["val"] | sets["test"] == set(prompts)
    for s in sets:  # each prompt where its SHA-1 says, and the recorded counts are the split sizes
        assert sets[s] == {p for p in prompts if sha1_split(p, fractions) == s}
        assert draws[s].counts == {k: len(v) for k, v in sets.items()}
        assert draws[s].describe()["fractions"] == list(fractions) and draws[s].split_by == "sha1"
    return draws


def test_splits_of_a_file_are_disjoint_hash_defined_and_order_free(prompt_files):
    prompts, txt, shuffled, jsonl = prompt_files
    draws = check_splits(str(txt), prompts)
    assert 290 < draws["train"].counts["train"] < 350 and draws["val"].counts["val"] > 20
    for other in (shuffled, jsonl):  # another order or format: the same prompts, in the same order
        for s in ("train", "val", "test"):
            assert draw_prompts(str(other), s, n=15).prompts == draw_prompts(str(txt), s, n=15).prompts
    # n keeps a fixed subset of the split, the same whatever n is
    assert draw_prompts(str(txt), "train", 10).prompts == draw_prompts(str(txt), "train", 30).prompts[:10]


def test_splits_of_real_coco_and_cc_captions(shared_data):
    coco = f"coco:{shared_data / 'coco' / 'captions_val2017.json'}"
    prompts, _ = normalize(read_source(coco))
    draws = check_splits(coco, prompts)
    assert sum(draws["train"].counts.values()) == len(prompts) > 24000
    cc = str(shared_data / "cc" / "Validation_GCC-1.1.0-Validation.head3000.tsv")  # recognized by its layout
    check_splits(cc, normalize(read_source(cc))[0], (0.7, 0.2, 0.1))


def test_unknown_source_and_empty_split_are_refused(prompt_files, tmp_path):
    _, txt, _, _ = prompt_files
    with pytest.raises(PromptSourceError, match="'foo:' is not a source kind") as e:
        draw_prompts("foo:bar.txt", "train")
    assert SYNTAX in str(e.value)
    with pytest.raises(FileNotFoundError, match="does not exist; a prompt source is world"):
        draw_prompts(str(tmp_path / "missing.txt"), "test")
    with pytest.raises(EmptySplitError, match=r"'val' of .* is empty: the split counts are train 400, val 0, test 0"):
        draw_prompts(str(txt), "val", fractions=(1.0, 0.0, 0.0))
    whole = draw_prompts(str(txt), None, 5)  # generate: the file's first prompts, unsplit
    assert whole.prompts == load_prompts(str(txt), 5) and whole.split_by == "none"


def test_every_prompt_flag_documents_the_same_syntax():
    from pipeline.fit import STAGES, config_class, field_docs

    fields = {"calibrate": "prompts", "score": "prompts", "q2b": "prompts", "generate": "prompts",
              "evaluate": "in_domain"}
    for stage, name in fields.items():
        docs = field_docs(config_class(STAGES[stage]))
        assert docs[name].startswith(f"prompt source: {SYNTAX}, split by the SHA-1 of each prompt"), stage
        if stage != "generate":  # generate takes the whole source
            assert docs["split_fractions"] == "train,val,test fractions of the hashed prompt split (use the same " \
                                              "in every stage of a run)", stage
    assert "the syntax of --prompts" in field_docs(config_class(STAGES["t2q"]))["predict"]


# The embedded world's prompts of the demo's stages, recorded with the code before draw_prompts
# (load_prompts('world', n, split) and the score stage's PromptDataModule): they must not move.
WORLD_PINS = {("train", 16): "cc470a006a642d54", ("val", 80): "6dc34017c7e4d339", ("val", 8): "35cdcf9c6f31ec9f"}


def test_the_world_keeps_its_scene_split_and_the_demo_its_prompts():
    from pipeline.evaluation.plan import plan_evaluation
    from pipeline.evaluation.settings import EvalSettings

    for (split, n), pin in WORLD_PINS.items():  # calibrate/q2b train (16), q2b val (80), generate (8)
        draw = draw_prompts("world", split, n)
        assert fingerprint(draw.prompts) == pin and draw.prompts == load_prompts("world", n, split)
        assert draw.split_by == "world scenes"
    assert draw_prompts("world:val", "train", 80).prompts == draw_prompts("world", "val", 80).prompts
    assert fingerprint(draw_prompts("world", None, 8, world_split="val").prompts) == WORLD_PINS[("val", 8)]  # generate
    plan = plan_evaluation("embedded", [], None, "world:val", None, 80, 1, 0, EvalSettings(fid=False, sfid=False),
                           clip="none")
    assert fingerprint(plan.splits[0].prompts) == WORLD_PINS[("val", 80)]  # the demo's evaluate step
    dm = PromptDataModule("world", None, 240, (0.8, 0.2, 0.0), seed=0)  # the demo's score step
    dm.setup()
    assert (fingerprint(dm.split("train")), fingerprint(dm.split("val"))) == ("5b77ca57722d7204", "3dc7fb425e099899")


def test_calibrate_q2b_and_evaluate_draw_their_own_split(prompt_files, tmp_path, monkeypatch):
    """calibrate (run for real on the seeded tiny pipeline) records and uses train; q2b trains on train and
    validates on val (its training replaced by a probe); evaluate's splits are test."""
    from pipeline.evaluation.plan import plan_evaluation
    from pipeline.evaluation.settings import EvalSettings
    from pipeline.fit import main
    from pipeline.models import tiny_pipeline
    from pipeline.quant import load_quantized
    from pipeline.stages import q2b as q2b_stage

    prompts, txt, _, _ = prompt_files
    split_of = {p: sha1_split(p) for p in prompts}
    main(["calibrate", "--model", "tiny-random", "--prompts", str(txt), "--cali-n", "6", "--steps", "2",
          "--a-bit-options", "8,16", "--run-dir", str(tmp_path / "cal")])
    manifest = json.loads((tmp_path / "cal" / "quant" / "manifest.json").read_text())
    record = manifest["prompt_split"]
    assert record["split"] == "train" and record["n"] == 6 and record["counts"]["train"] > 290
    _, meta, _ = load_quantized(tiny_pipeline(0).unet, tmp_path / "cal" / "quant")
    assert meta["extra"]["cali_n"] == 6

    seen = {}

    class Probe(Exception):
        pass

    def probe(pipe, state, options, source, train, val, **kw):
        seen.update(train=train, val=val, steps=kw["steps"], guidance=kw["guidance"])
        raise Probe

    monkeypatch.setattr(q2b_stage, "train_q2b_on_state", probe)
    with pytest.raises(Probe):
        q2b_stage.q2b(q2b_stage.Q2BConfig(model="tiny-random", quant_state=str(tmp_path / "cal" / "quant"),
                                          criterion="length", prompts=str(txt), n=12, val_n=5,
                                          run_dir=str(tmp_path / "q2b")))
    assert {split_of[p] for p in seen["train"]} == {"train"} and len(seen["train"]) == 12
    assert {split_of[p] for p in seen["val"]} == {"val"} and len(seen["val"]) == 5
    assert (seen["steps"], seen["guidance"]) == (2, 7.5)  # the state's steps, the SD family's guidance

    plan = plan_evaluation("tiny-random", [], None, str(txt), str(txt), 7, 1, 0, EvalSettings(fid=False, sfid=False),
                           clip="none")
    for split in plan.splits:
        assert {split_of[p] for p in split.prompts} == {"test"} and split.draw["split"] == "test"

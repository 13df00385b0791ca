"""The bounded-memory item store (pipeline/shards.py): exact round trips through disk shards, the RAM cap
counted in bytes held, the DDP share, the estimate printed before a stage, and bit-identical reconstruction
and Q2B training with a cap that forces disk shards."""
import math
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from pipeline.calibration import qdiff as qdiff_mod
from pipeline.calibration.blocks import reconstruction_units
from pipeline.shards import GIB, ItemStore, estimate_line, item_nbytes, ram_cap_bytes, rank_share

STEPS = 4


def _item(k: int) -> dict:
    g = torch.Generator().manual_seed(k)
    base = torch.randn(3, 8, 5, generator=g)
    shared = torch.randn(2, 4, generator=g)
    return {"args": (base.transpose(0, 2), shared),  # a non-contiguous view, and a tensor used twice
            "kwargs": {"encoder_hidden_states": shared, "attention_mask": None, "scale": 1.5,
                       "ids": torch.arange(k + 2), "half": torch.randn(4, generator=g).half()},
            "out": torch.randn(3, 8, 5, generator=g), "t": torch.tensor(900 - k), "step": k, "tag": f"call{k}"}


def _same(a, b) -> None:
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and a.device == b.device
        assert torch.equal(a, b)
    elif isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k])
    else:
        assert a == b and type(a) is type(b)


def test_items_round_trip_exactly_and_the_cap_bounds_bytes_held(tmp_path):
    items = [_item(k) for k in range(6)]
    size = item_nbytes(items[0])
    # tensors counted once each: the shared tensor appears twice in the item
    assert size == 4 * (3 * 8 * 5 * 2 + 2 * 4) + 8 + 8 * 2 + 2 * 4  # fp32, t and ids int64, half
    cap = 2.5 * size  # two items fit, the rest go to disk
    store = ItemStore(tmp_path / "spill", cap)
    for it in items:
        store.append(it)
        assert store.held_bytes <= cap
    assert store.peak_held_bytes <= cap and store.held_bytes == size + item_nbytes(items[1])
    assert store.on_disk() == 4 and len(list((tmp_path / "spill").glob("*.safetensors"))) == 4
    assert store.disk_bytes == sum(p.stat().st_size for p in (tmp_path / "spill").iterdir())
    assert store[0] is items[0]  # kept in RAM: the very object
    for k, it in enumerate(items):
        back = store[k]
        _same(it, back)
        assert store.field(k, "step") == k
    assert back["args"][1] is back["kwargs"]["encoder_hidden_states"]  # shared on the way in, shared back
    view = store.subset([5, 1, 3])
    assert [view.field(i, "step") for i in range(3)] == [5, 1, 3] and view[0]["step"] == 5
    assert [it["step"] for it in store[::2]] == [0, 2, 4]
    store.close()
    assert len(store) == 0 and not (tmp_path / "spill").exists()


def test_zero_cap_puts_every_item_on_disk_and_no_cap_none(tmp_path):
    with ItemStore(tmp_path / "a", ram_cap_bytes(0)) as st:
        for k in range(3):
            st.append(_item(k))
        assert st.on_disk() == 3 and st.peak_held_bytes == 0
    assert not (tmp_path / "a").exists()
    st = ItemStore(None, ram_cap_bytes(None))
    st.append(_item(0))
    assert st.on_disk() == 0 and ram_cap_bytes(None) == math.inf


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="--ram-cap-gib -1.*must be >= 0"):
        ram_cap_bytes(-1)
    with pytest.raises(ValueError, match="needs a spill_dir"):
        ItemStore(None, 10)
    with pytest.raises(TypeError, match="holds a object"):
        ItemStore(Path("/nonexistent"), 0).append({"x": object(), "t": torch.ones(1)})
    with pytest.raises(ValueError, match="rank 2 is outside a world of 2"):
        rank_share(5, 2, 2)


def test_rank_shares_partition_the_items():
    shares = [rank_share(11, r, 3) for r in range(3)]
    assert sorted(sum(shares, [])) == list(range(11)) and [len(s) for s in shares] == [4, 4, 3]


def test_estimate_line_from_sizes():
    assert estimate_line("x", 3 * GIB, 1 * GIB, 0.5 * GIB) == \
        "x will hold about 1.5 GiB in RAM, 2 GiB on disk (cap 1 GiB)"
    assert estimate_line("x", 0.25 * GIB, math.inf) == "x will hold about 0.25 GiB in RAM, 0 GiB on disk (no cap)"


# ---------------------------------------------------------------------------
# the reconstruction and Q2B on the embedded world: a tiny cap changes nothing
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from data.prompts import load_prompts
    from pipeline.calibration.data import collect
    from pipeline.models import load_pipeline

    root = tmp_path_factory.mktemp("world")
    pipe = load_pipeline("embedded")
    collect(pipe, load_prompts("world", 4, split="train"), root / "cali", steps=STEPS, cali_st=STEPS, batch_size=2)
    return root


class _Recorded(ItemStore):
    made: list = []

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.disk_items = 0
        _Recorded.made.append(self)

    def append(self, item):
        super().append(item)
        self.disk_items = self.on_disk()  # close() forgets them; keep the count


def _qdiff_state(root, run, cap_gib, monkeypatch, capsys):
    from pipeline.calibration.data import CalibrationData
    from pipeline.models import load_pipeline
    from pipeline.quant import QuantConfig, quantize_unet
    from pipeline.quant.state import quantizer_state

    pipe = load_pipeline("embedded")
    data = CalibrationData(root / "cali", pipe, steps=STEPS)
    quantize_unet(pipe.unet, QuantConfig(w_bits=4, a_bits=8, n_steps=STEPS, time_aware=True,
                                         weight_rounding="adaround"))  # min-max inits: the L_p search is slow here
    _Recorded.made = []
    monkeypatch.setattr(qdiff_mod, "ItemStore", _Recorded)
    every = reconstruction_units(pipe.unet)  # the real one: a second call finds qdiff's patched
    # a ResNet block, a transformer block and a lone layer: every kind of unit input, at a fraction of the time
    kinds = ["down_blocks.0.resnets.0", "down_blocks.0.attentions.0.transformer_blocks.0", "conv_in"]
    monkeypatch.setattr(qdiff_mod, "reconstruction_units", lambda unet: OrderedDict((k, every[k]) for k in kinds))
    torch.manual_seed(0)
    qdiff_mod.calibrate_qdiff(pipe.unet, data, root / run, iters_w=3, iters_a=4, w_lr=1e-2, seed=1,
                              trainer_kwargs={"enable_progress_bar": False}, ram_cap_gib=cap_gib)
    return quantizer_state(pipe.unet), list(_Recorded.made), capsys.readouterr().out


def test_reconstruction_with_a_tiny_cap_gives_the_same_state(world, monkeypatch, capsys):
    ram, ram_stores, out_ram = _qdiff_state(world, "ram", None, monkeypatch, capsys)
    cap_gib = 2 ** -12  # 256 KiB: a unit keeps a few items in RAM and spills the rest
    disk, stores, out = _qdiff_state(world, "disk", cap_gib, monkeypatch, capsys)
    assert sum(s.disk_items for s in ram_stores) == 0
    assert sum(s.disk_items for s in stores) > 0 and any(s.peak_held_bytes > 0 for s in stores)
    assert max(s.peak_held_bytes for s in stores) <= cap_gib * GIB
    assert not (world / "disk" / "spill" / "rank0").exists()  # shards deleted unit by unit
    assert "the reconstruction will hold about" in out and "cap 0.000244 GiB" in out
    assert "no cap" in out_ram
    assert ram.keys() == disk.keys()
    for k in ram:
        assert torch.equal(ram[k], disk[k]), k


def test_q2b_with_a_tiny_cap_gives_the_same_tables(world, tmp_path, capsys):
    from pipeline.calibration.data import CalibrationData
    from pipeline.metrics.cost import fab_weights, layer_stats
    from pipeline.models import load_pipeline
    from pipeline.qlip.q2b import Q2BModule
    from pipeline.qlip.train import fit_q2b, item_bytes, training_items
    from pipeline.quant import QuantConfig, act_banks, observing, quant_layers, quantize_unet, set_step

    q = torch.linspace(0, 1, 4)

    def run(spill):
        pipe = load_pipeline("embedded")
        data = CalibrationData(world / "cali", pipe, steps=STEPS)
        # 1.5 items: the first stays in RAM, the others go to disk
        store = ItemStore(spill, 1.5 * item_bytes(data)) if spill else None
        items = training_items(pipe.unet, data, q, store=store)
        if store is not None:
            assert store.on_disk() == len(items) - 1 and 0 < store.peak_held_bytes <= store.cap
            assert item_nbytes(items[0]) == item_bytes(data)  # the estimate's item size is the real one
        quantize_unet(pipe.unet, QuantConfig(w_bits=4, a_bits=8, a_bit_options=[8, 16, 32], n_steps=STEPS))
        with observing(pipe.unet), torch.no_grad():
            for step, call in data.unet_calls():
                set_step(pipe.unet, step)
                pipe.unet(**call)
        for bank in act_banks(pipe.unet).values():
            bank.finalize()
        layers = list(quant_layers(pipe.unet))
        q2b = Q2BModule(layers, STEPS, [8, 16, 32], float(q.mean()), float(q.std()))
        w = fab_weights(layer_stats(pipe.unet), layers)
        module = fit_q2b(pipe.unet, q2b, items, w, 12.0, 5.0, epochs=2, trainer_kwargs={"enable_progress_bar": False})
        if store is not None:
            store.close()
        return q2b.state_dict(), module.history

    ram, h_ram = run(None)
    disk, h_disk = run(tmp_path / "spill")
    assert h_ram == h_disk and len(h_ram) == 2
    assert not (tmp_path / "spill").exists()
    for k in ram:
        assert torch.equal(ram[k], disk[k]), k


def _collect_as_rank(rank: int, world: int, out: str, queue) -> None:
    """One torchrun-style process: collect its share of the batches into the shared folder; count its runs."""
    from data.prompts import load_prompts
    from pipeline.calibration import data as data_mod
    from pipeline.models import tiny_pipeline

    torch.set_num_threads(1)
    real, runs = data_mod.denoise, []
    data_mod.denoise = lambda *a, **k: runs.append(1) or real(*a, **k)
    data_mod.collect(tiny_pipeline(0), load_prompts("builtin", 5), out, steps=STEPS, cali_st=2, batch_size=2,
                     share=(rank, world), wait_s=300)
    queue.put((rank, len(runs)))


def test_ranks_started_at_once_collect_their_own_batches(tmp_path):
    """Under torchrun/SLURM every rank collects every world-th prompt batch into the one folder and returns
    once all are there; the data equals a single process's (mutation caught: ignoring `share`, so that every
    rank collects every batch, makes each rank run 3 trajectories instead of 2 and 1)."""
    import multiprocessing as mp

    from safetensors.torch import load_file

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_collect_as_rank, args=(r, 2, str(tmp_path / "ranks"), queue)) for r in (1, 0)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    assert dict(queue.get() for _ in procs) == {0: 2, 1: 1}  # 3 batches of 5 prompts: 0 and 2, then 1
    _collect_as_rank(0, 1, str(tmp_path / "one"), queue)
    assert queue.get() == (0, 3)
    files = sorted(p.name for p in (tmp_path / "one").glob("*.safetensors"))
    assert files == sorted(p.name for p in (tmp_path / "ranks").glob("*.safetensors")) and len(files) == 3 * 3
    for name in files:
        a, b = load_file(tmp_path / "one" / name), load_file(tmp_path / "ranks" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

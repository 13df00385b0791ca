"""Real low-bit inference: export a calibrated state as integers (`export_unet`), load it without the FP
weights (`load_unet`, `attach`; fp32, or `dtype="bf16"` for the bf16 runtime), run it on a backend
(`set_backend`: reference | onednn | gpu); exported with Q2B's tables, generate with text-aware bits (`load_qlip`).
docs/deploy.md."""
from pipeline.deploy.artifact import DEPLOY, attach, export_unet, load_unet, read_deploy_meta, to_real
from pipeline.deploy.backends import BACKENDS, check_backend, check_weight_zero_point, make_backend, set_backend
from pipeline.deploy.layer import RealQuantLayer
from pipeline.deploy.pack import pack_layer, pack_nibbles, unpack_nibbles
from pipeline.deploy.qlip import load_qlip

__all__ = ["BACKENDS", "DEPLOY", "RealQuantLayer", "attach", "check_backend", "check_weight_zero_point",
           "export_unet", "load_qlip", "load_unet", "make_backend", "pack_layer", "pack_nibbles", "read_deploy_meta",
           "set_backend", "to_real", "unpack_nibbles"]

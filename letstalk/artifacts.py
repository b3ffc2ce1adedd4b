"""The on-disk contracts between the jobs, typed: one class per artifact, with `load` and `save`.

    render bundle        LetsTalkPipeline.from_pretrained / save_pretrained (letstalk.pipeline);
                         `export_bundle` makes one from a training checkpoint and the shards' codecs
    shard manifest       ShardManifest: OUTPUT/manifest.json of preprocessing. Written by
                         letstalk_platform.preprocess; read by data, train, evaluate, register, demo.
                         It records everything a reader needs (clip sizes, feature shapes, the
                         codecs and their fingerprints, every input's status), so nobody re-reads
                         the preprocessing bundle to learn a shape.
    training checkpoint  CheckpointState (state.json) + RankState (rank{r}.json) + each rank's EMA
                         (ema-rank{r}.safetensors) + DeepSpeed's ds/ + transformer/ (the full EMA
                         model). Written and read by letstalk_platform.checkpoint.

Every reader fails with one line (ArtifactError, a ValueError) on a file it cannot use, naming the
command that makes a new one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .clips import ClipSpec
from .diffusion import ClipTarget

MANIFEST_VERSION = 2  # 2: feature shapes, model fingerprints, statuses done/failed/filtered, quality, tracks
CHECKPOINT_VERSION = 1
TENSOR_COLUMNS = ("latents", "audio", "motion", "refs", "mouth")
SPLITS = ("train", "eval")
InputStatus = Literal["done", "failed", "filtered"]  # filtered: a quality threshold dropped it


class ArtifactError(ValueError):
    """An artifact on disk is missing, from an older version, or does not fit: one line, with the fix."""


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """JSON written to a temporary name and renamed: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def dir_fingerprint(path: str | os.PathLike) -> str:
    """sha1 over every file's relative path and content under `path` (a model folder): the same
    weights copied elsewhere match; retrained or swapped weights do not."""
    root, h = Path(path), hashlib.sha1()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def same_model(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two model folders hold the same model: the same files, JSON equal but for "_"-keys
    (diffusers' version and source path), safetensors with equal tensors, other files byte for byte.
    A bundle re-saved by export (training, distillation) has the codecs of its shards, but not their
    bytes: dir_fingerprint tells them apart, this does not."""
    import json

    from safetensors.torch import load_file

    ra, rb = Path(a), Path(b)
    files = sorted(p.relative_to(ra) for p in ra.rglob("*") if p.is_file())
    if files != sorted(p.relative_to(rb) for p in rb.rglob("*") if p.is_file()):
        return False
    for rel in files:
        fa, fb = ra / rel, rb / rel
        if rel.suffix == ".json":
            strip = lambda d: {k: v for k, v in d.items() if not k.startswith("_")} if isinstance(d, dict) else d  # noqa: E731
            if strip(json.loads(fa.read_text())) != strip(json.loads(fb.read_text())):
                return False
        elif rel.suffix == ".safetensors":
            ta, tb = load_file(fa), load_file(fb)
            if ta.keys() != tb.keys() or not all(ta[k].dtype == tb[k].dtype and ta[k].equal(tb[k]) for k in ta):
                return False
        elif fa.read_bytes() != fb.read_bytes():
            return False
    return True


# ------------------------------------------------------------------------------------------
# Shard manifest
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FeatureShapes:
    """The shapes of a clip row's tensors besides the clip sizes: measured from the tensors the
    tokenizer wrote, so they are what a reader will find."""

    latent_channels: int
    latent_size: int  # latents are (C, latent_size, latent_size) per frame
    audio_layers: int
    audio_feature_dim: int

    def architecture(self, spec: ClipSpec) -> dict[str, int]:
        """The LetsTalkTransformer arguments that the shards fix (the rest is the preset's)."""
        return {"input_size": self.latent_size, "in_channels": self.latent_channels,
                "num_frames": spec.clip_frames, "num_motion_frames": spec.motion_frames,
                "audio_window": spec.audio_window, "audio_layers": self.audio_layers,
                "audio_feature_dim": self.audio_feature_dim}


@dataclass
class InputRecord:
    """One input video of preprocessing and what became of it."""

    path: str
    video_id: str
    identity: str
    split: str
    fingerprint: str  # size:mtime of the video file: a changed file is processed again
    status: InputStatus = "failed"
    reason: str = ""
    clips: int = 0
    shard: str = ""  # relative to the manifest's folder
    face_found: bool = False
    quality: dict[str, Any] = field(default_factory=dict)  # letstalk.quality.Quality.to_dict()
    track: str = ""  # relative: tracks/{video_id}.json, the crop box of every frame (for paste-back)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InputRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class ShardManifest:
    """OUTPUT/manifest.json of preprocessing: what the shards hold and where they came from."""

    clip_spec: ClipSpec
    features: FeatureShapes | None  # None when no input produced a clip
    bundle: str  # the preprocessing bundle whose vae/ and audio_encoder/ tokenized the shards
    models: dict[str, str]  # "vae", "audio_encoder" -> dir_fingerprint at preprocessing time
    inputs: list[InputRecord]
    config: dict[str, Any] = field(default_factory=dict)  # the preprocessing config, for the record
    last_run: dict[str, float] = field(default_factory=dict)  # processed, seconds
    tensor_columns: tuple[str, ...] = TENSOR_COLUMNS
    schema_version: int = MANIFEST_VERSION

    FILE = "manifest.json"

    # --- what readers ask -----------------------------------------------------------------
    def done(self, split: str | None = None) -> list[InputRecord]:
        return [e for e in self.inputs if e.status == "done" and (split is None or e.split == split)]

    def clip_count(self, split: str) -> int:
        return sum(e.clips for e in self.done(split))

    def counts(self) -> dict[str, Any]:
        done = self.done()
        filtered = sum(e.status == "filtered" for e in self.inputs)
        return {"inputs": len(self.inputs), "done": len(done), "failed": len(self.inputs) - len(done) - filtered,
                "filtered": filtered,
                "clips": {s: self.clip_count(s) for s in SPLITS},
                "identities": {s: len({e.identity for e in self.done(s)}) for s in SPLITS}}

    def architecture(self) -> dict[str, int]:
        if self.features is None:
            raise ArtifactError("the shards hold no clips (every input failed): nothing to train on")
        return self.features.architecture(self.clip_spec)

    @property
    def vae(self) -> Path:
        return Path(self.bundle) / "vae"

    @property
    def audio_encoder(self) -> Path:
        return Path(self.bundle) / "audio_encoder"

    def check_models(self) -> None:
        """The bundle's codecs are still the ones that tokenized the shards."""
        for name, path in (("vae", self.vae), ("audio_encoder", self.audio_encoder)):
            if not path.is_dir():
                raise ArtifactError(f"{path}: the {name} that tokenized these shards is gone")
            if dir_fingerprint(path) != self.models.get(name):
                raise ArtifactError(f"{path} changed since these shards were tokenized with it: "
                                    "re-run jobs/preprocess.py into a new folder")

    # --- on disk --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "clip_spec": dataclasses.asdict(self.clip_spec),
                "features": dataclasses.asdict(self.features) if self.features else None,
                "bundle": self.bundle, "models": self.models, "tensor_columns": list(self.tensor_columns),
                "config": self.config, "last_run": self.last_run,
                "counts": self.counts(),  # derived: for people reading the file
                "inputs": [dataclasses.asdict(e) for e in self.inputs]}

    def save(self, root: str | os.PathLike) -> Path:
        path = Path(root) / self.FILE
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def exists(cls, root: str | os.PathLike) -> bool:
        return (Path(root) / cls.FILE).is_file()

    @classmethod
    def load(cls, root: str | os.PathLike) -> "ShardManifest":
        path = Path(root) / cls.FILE
        if not path.is_file():
            raise ArtifactError(f"{root} has no {cls.FILE}: run jobs/preprocess.py --output {root} first")
        try:
            data = json.loads(path.read_text())
        except ValueError as e:
            raise ArtifactError(f"{path} is not valid JSON ({e})") from None
        version = data.get("schema_version")
        if version != MANIFEST_VERSION:
            raise ArtifactError(
                f"{path} is manifest version {version}, this version reads {MANIFEST_VERSION}: re-run "
                f"jobs/preprocess.py {_rerun_args(data, root)} (finished shards are reused, not redone)")
        feats = data["features"]
        return cls(clip_spec=ClipSpec(**data["clip_spec"]), features=FeatureShapes(**feats) if feats else None,
                   bundle=data["bundle"], models=dict(data["models"]),
                   inputs=[InputRecord.from_dict(e) for e in data["inputs"]], config=data.get("config", {}),
                   last_run=data.get("last_run", {}), tensor_columns=tuple(data["tensor_columns"]),
                   schema_version=version)

    @classmethod
    def previous_inputs(cls, root: str | os.PathLike) -> list[InputRecord]:
        """The finished inputs recorded by any manifest version in `root` (a re-run reuses their
        shards): version 1 called a finished input "ok"."""
        path = Path(root) / cls.FILE
        if not path.is_file():
            return []
        try:
            entries = json.loads(path.read_text()).get("inputs", [])
        except ValueError:
            return []
        records = [InputRecord.from_dict({**e, "status": "done" if e.get("status") in ("ok", "done") else "failed"})
                   for e in entries if {"path", "video_id", "shard"} <= e.keys()]
        return [r for r in records if r.status == "done"]


def _rerun_args(data: dict[str, Any], root: str | os.PathLike) -> str:
    cfg = data.get("config") or {}
    return " ".join(f"--{k} {cfg[k]}" for k in ("input", "model") if k in cfg) + f" --output {root}"


# ------------------------------------------------------------------------------------------
# Training checkpoint
# ------------------------------------------------------------------------------------------

@dataclass
class CheckpointState:
    """state.json of a training checkpoint: where the run stands and how it was trained.

    `settings`: the run's settings an exact resume must share, by dotted key (e.g. {"seed": 0,
    "data.shuffle": true, "data.batch_size": 4, "model.preset": "B"}: letstalk_platform.checkpoint
    decides which). Checkpoints written before state.json held them kept them in resume.json beside it
    (LEGACY_SETTINGS_FILE), which `load` reads; None: recorded in neither."""

    step: int
    data_position: tuple[int, int] | None  # (epoch, batch in epoch) of the next batch
    world_size: int
    seed: int = 0
    shuffle: bool = True
    target: ClipTarget = field(default_factory=ClipTarget)
    prediction: str = "epsilon"
    settings: dict[str, Any] | None = None
    version: int = CHECKPOINT_VERSION

    FILE = "state.json"
    LEGACY_SETTINGS_FILE = "resume.json"

    def save(self, folder: str | os.PathLike) -> None:
        data = {"version": self.version, "step": self.step,
                "data_position": list(self.data_position) if self.data_position else None,
                "world_size": self.world_size, "seed": self.seed, "shuffle": self.shuffle,
                "residual": self.target.residual, "residual_scale": self.target.scale,
                "residual_base": self.target.base, "prediction": self.prediction}
        if self.settings is not None:
            data["settings"] = self.settings
        (Path(folder) / self.FILE).write_text(json.dumps(data))

    @classmethod
    def load(cls, folder: str | os.PathLike, resumable: bool = True) -> "CheckpointState":
        """resumable: the checkpoint must hold what exact resume needs (data position, RNG states)."""
        path = Path(folder) / cls.FILE
        if not path.is_file():
            raise ArtifactError(f"{folder} is not a training checkpoint (no {cls.FILE})")
        data = json.loads(path.read_text())
        position = data.get("data_position")
        if resumable and position is None:
            raise ArtifactError(f"{folder} was written before checkpoints held the data position and RNG states: "
                                "it cannot be resumed exactly; train under a new name (or init from its transformer/)")
        settings = data.get("settings")
        legacy = Path(folder) / cls.LEGACY_SETTINGS_FILE
        if settings is None and legacy.is_file():
            settings = json.loads(legacy.read_text())
        return cls(step=int(data["step"]), data_position=tuple(position) if position else None,
                   world_size=int(data.get("world_size", 0)), seed=int(data.get("seed", 0)),
                   shuffle=bool(data.get("shuffle", True)),
                   target=ClipTarget(bool(data.get("residual", False)), float(data.get("residual_scale", 1.0)),
                                     str(data.get("residual_base", "portrait"))),
                   prediction=str(data.get("prediction", "epsilon")), settings=settings,
                   version=int(data.get("version", 1)))


@dataclass
class RankState:
    """rank{r}.json of a training checkpoint: one worker's random streams and the node it ran on."""

    rng: dict[str, Any]
    node_id: str = ""

    @staticmethod
    def file(folder: str | os.PathLike, rank: int) -> Path:
        return Path(folder) / f"rank{rank}.json"

    def save(self, folder: str | os.PathLike, rank: int) -> None:
        self.file(folder, rank).write_text(json.dumps({"rng": self.rng, "node_id": self.node_id}))

    @classmethod
    def load(cls, folder: str | os.PathLike, rank: int) -> "RankState":
        path = cls.file(folder, rank)
        if not path.is_file():
            raise ArtifactError(f"{folder} has no {path.name}: it was written by fewer workers than this run has")
        data = json.loads(path.read_text())
        return cls(rng=data["rng"], node_id=data.get("node_id", ""))


def ema_file(folder: str | os.PathLike, rank: int) -> Path:
    """This rank's EMA of its fp32 master partitions (safetensors)."""
    return Path(folder) / f"ema-rank{rank}.safetensors"


def export_bundle(checkpoint: str | os.PathLike, manifest: ShardManifest, out: str | os.PathLike,
                  **settings: Any) -> Path:
    """A training checkpoint's EMA transformer + the codecs that tokenized its shards -> a render
    bundle. How the model was trained (target, prediction) comes from the checkpoint's state.json;
    `settings`: other PipelineSettings fields (e.g. strength)."""
    from .audio import AudioEncoder
    from .pipeline import LetsTalkPipeline, PipelineSettings
    from .transformer import LetsTalkTransformer
    from .vae import LatentCodec

    checkpoint = Path(checkpoint)
    if not (checkpoint / "transformer" / "config.json").is_file():
        raise ArtifactError(f"{checkpoint} is not a training checkpoint (no transformer/config.json)")
    state = CheckpointState.load(checkpoint, resumable=False)
    manifest.check_models()
    spec = manifest.clip_spec
    settings |= {"residual": state.target.residual, "residual_scale": state.target.scale,
                 "residual_base": state.target.base, "prediction": state.prediction}
    pipe = LetsTalkPipeline(  # the constructor checks that the three parts fit together
        LetsTalkTransformer.from_pretrained(checkpoint / "transformer"),
        LatentCodec.from_pretrained(manifest.vae),
        AudioEncoder.from_pretrained(manifest.audio_encoder, window=spec.audio_window),
        PipelineSettings(fps=spec.fps, sample_rate=spec.sample_rate, **settings),
    )
    out = pipe.save_pretrained(out)
    footage = Path(manifest.bundle) / "avatar"  # a re-voicing avatar's footage travels with its model
    if footage.is_dir():
        shutil.copytree(footage, out / "avatar")
    return out

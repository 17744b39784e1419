"""Read and write diffusers / transformers model folders (safetensors or ``.bin``) as NNX modules.

Every network is built abstractly (``nnx.eval_shape``: no random initialisation of the full-size
model) and filled tensor by tensor from the file, through the rule tables of ``convert.py``.
Export writes folders that diffusers / transformers load with ``from_pretrained``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import jax.numpy as jnp
from flax import nnx

from pv_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel
from pv_jax.models.layers import abstract_module
from pv_jax.models.unet import UNet2DConditionModel, UNetConfig
from pv_jax.models.vae import AutoencoderKL, VAEConfig
from pv_jax.weights.convert import (
    CLIP_IGNORE,
    CLIP_RULES,
    CLIP_TEXT_STRIP_PREFIXES,
    CLIP_VISION_STRIP_PREFIXES,
    DEFAULT_RULES,
    LazyTensor,
    export_lazy,
    load_into,
    nothing,
)
from pv_jax.weights.tensor_files import (
    CheckpointFolderError,
    open_tensors,
    write_sharded_safetensors,
)

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
TRANSFORMERS_WEIGHTS = ("model", "pytorch_model")
SD_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_SUBFOLDERS = (
    "unet",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "scheduler",
)
SD_PIPELINE = "StableDiffusionPipeline"
SDXL_PIPELINE = "StableDiffusionXLPipeline"
# Buffers that diffusers/transformers may store but that are not parameters.
_IGNORE = (*CLIP_IGNORE,)


def find_weights(folder: Path, names: tuple[str, ...], variant: str | None = None) -> list[Path]:
    """The weight file(s) in ``folder``: safetensors first, then ``.bin``; sharded via index.

    ``variant="fp16"`` prefers ``*.fp16.*`` files; without it they are used when they are the
    only weights present (as in many SD folders).
    """
    suffixes = [".safetensors", ".bin"]
    variants = [f".{variant}", ""] if variant else ["", ".fp16"]
    for suffix in suffixes:
        for var in variants:
            for name in names:
                single = folder / f"{name}{var}{suffix}"
                if single.is_file():
                    return [single]
                index = folder / f"{name}{var}{suffix}.index.json"
                if index.is_file():
                    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                    return [folder / s for s in shards]
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise CheckpointFolderError(
        f"no weights in {folder}: expected one of "
        f"{[n + s for n in names for s in suffixes]} (or an .index.json / .fp16 variant); "
        f"found {present}"
    )


def read_config(folder: Path, what: str) -> dict[str, Any]:
    """``folder/config.json`` as a dict, or a clear error naming what was expected."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointFolderError(
            f"{folder} is not a {what} folder: it has no config.json "
            "(expected a folder written by save_pretrained)"
        )
    return json.loads(path.read_text())


def _build(ctor: Callable[[nnx.Rngs], nnx.Module], files: list[Path], **load_kwargs) -> nnx.Module:
    abstract = abstract_module(ctor)
    with open_tensors(files) as source:
        return load_into(abstract, source, **load_kwargs)


def load_unet(
    folder: str | os.PathLike,
    *,
    dtype: jnp.dtype = jnp.float32,
    attention: str = "auto",
    remat: bool = False,
    variant: str | None = None,
    skip: nnx.filterlib.Filter = nothing,
    **kwargs,
) -> UNet2DConditionModel:
    """A diffusers ``UNet2DConditionModel`` folder as our NNX UNet (``kwargs`` to the ctor).

    Parameters matching ``skip`` (added by a ``cross_attention_cls``, e.g. PhotoVerse's LoRA)
    are not read from the folder and stay abstract: the caller initialises them.
    """
    folder = Path(folder)
    cfg = UNetConfig.from_diffusers(read_config(folder, "diffusers UNet2DConditionModel"))
    return _build(
        lambda r: UNet2DConditionModel(
            cfg, dtype=dtype, attention=attention, remat=remat, rngs=r, **kwargs
        ),
        find_weights(folder, (DIFFUSERS_WEIGHTS,), variant),
        rules=DEFAULT_RULES,
        what=f"UNet in {folder}",
        ignore=_IGNORE,
        skip=skip,
    )


def load_vae(
    folder: str | os.PathLike,
    *,
    dtype: jnp.dtype = jnp.float32,
    attention: str = "auto",
    remat: bool = False,
    variant: str | None = None,
) -> AutoencoderKL:
    """A diffusers ``AutoencoderKL`` folder as our NNX VAE (``remat``: its decoder's blocks
    recomputed in the backward pass)."""
    folder = Path(folder)
    cfg = VAEConfig.from_diffusers(read_config(folder, "diffusers AutoencoderKL"))
    return _build(
        lambda r: AutoencoderKL(cfg, dtype=dtype, attention=attention, remat=remat, rngs=r),
        find_weights(folder, (DIFFUSERS_WEIGHTS,), variant),
        rules=DEFAULT_RULES,
        what=f"VAE in {folder}",
        ignore=_IGNORE,
    )


def _with_projection(cfg: dict) -> bool:
    return any("WithProjection" in a for a in cfg.get("architectures") or ())


# What differs between the two CLIP towers: config and model classes, key prefix, class name.
_CLIP_TOWERS = {
    "text": (CLIPTextConfig, CLIPTextModel, CLIP_TEXT_STRIP_PREFIXES, "CLIPTextModel"),
    "vision": (CLIPVisionConfig, CLIPVisionModel, CLIP_VISION_STRIP_PREFIXES, "CLIPVisionModel"),
}


def _clip_part(raw: dict, tower: str) -> tuple[bool, tuple[str, ...]]:
    """(with projection, keys to ignore) for one tower of a CLIP folder: a full ``CLIPModel``
    also holds the other tower, its projection and the logit scale."""
    full_clip = f"{tower}_config" in raw
    proj = _with_projection(raw) or "CLIPModel" in (raw.get("architectures") or ())
    if not full_clip:
        return proj, _IGNORE
    other, other_proj = ("vision", "visual") if tower == "text" else ("text", "text")
    return proj, (*_IGNORE, rf"^{other}_model\.", rf"^{other_proj}_projection\.", r"^logit_scale$")


def load_clip_tower(
    folder: str | os.PathLike,
    tower: Literal["text", "vision"],
    *,
    dtype: jnp.dtype = jnp.float32,
    attention: str = "auto",
    variant: str | None = None,
) -> CLIPTextModel | CLIPVisionModel:
    """One tower of a transformers ``CLIP{Text,Vision}Model[WithProjection]`` (or full
    ``CLIPModel``) folder."""
    config_cls, model_cls, strip_prefixes, name = _CLIP_TOWERS[tower]
    folder = Path(folder)
    raw = read_config(folder, f"transformers {name}")
    cfg = config_cls.from_hf(raw)
    proj, ignore = _clip_part(raw, tower)
    return _build(
        lambda r: model_cls(cfg, with_projection=proj, dtype=dtype, attention=attention, rngs=r),
        find_weights(folder, TRANSFORMERS_WEIGHTS, variant),
        rules=CLIP_RULES,
        what=f"CLIP {tower} model in {folder}",
        strip_prefixes=strip_prefixes,
        ignore=ignore,
    )


def load_clip_text(folder: str | os.PathLike, **kwargs) -> CLIPTextModel:
    """A transformers ``CLIPTextModel[WithProjection]`` (or full ``CLIPModel``) folder."""
    return load_clip_tower(folder, "text", **kwargs)


def load_clip_vision(folder: str | os.PathLike, **kwargs) -> CLIPVisionModel:
    """A transformers ``CLIPVisionModel[WithProjection]`` (or full ``CLIPModel``) folder."""
    return load_clip_tower(folder, "vision", **kwargs)


def load_clip(
    folder: str | os.PathLike,
    *,
    dtype: jnp.dtype = jnp.float32,
    attention: str = "auto",
    variant: str | None = None,
) -> tuple[CLIPTextModel, CLIPVisionModel]:
    """Both towers, with their projections, of a transformers ``CLIPModel`` folder."""
    raw = read_config(Path(folder), "transformers CLIPModel")
    if "text_config" not in raw or "vision_config" not in raw:
        raise CheckpointFolderError(
            f"{folder} is not a full CLIP folder: its config.json lacks text_config/vision_config "
            "(expected a transformers CLIPModel saved with save_pretrained, e.g. "
            "openai/clip-vit-large-patch14)"
        )
    kw = dict(dtype=dtype, attention=attention, variant=variant)
    return load_clip_text(folder, **kw), load_clip_vision(folder, **kw)


def _packaged_tokenizer(**kwargs):
    from transformers import CLIPTokenizer

    folder = Path(__file__).resolve().parent.parent / "assets" / "clip_tokenizer"
    # transformers 5's CLIPTokenizer takes the vocabulary and merges themselves; it ignores
    # the old ``vocab_file``/``merges_file`` arguments and would build an empty vocabulary.
    vocab = json.loads((folder / "vocab.json").read_text())
    lines = (folder / "merges.txt").read_text().splitlines()
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#")]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, **kwargs)


def load_tokenizer(folder: str | os.PathLike | None = None):
    """The CLIP tokenizer of an SD folder's ``tokenizer/``, or the packaged OpenAI CLIP BPE."""
    from transformers import CLIPTokenizer

    if folder is None:
        return _packaged_tokenizer()
    return CLIPTokenizer.from_pretrained(str(folder))


# SDXL's tokenizer_2 (OpenCLIP ViT-bigG/14's) is OpenAI CLIP's BPE padded with "!" (id 0)
# instead of "<|endoftext|>": the ids of a prompt are the same, the padding after EOS differs.
SDXL_TOKENIZER_2_PAD = "!"


def load_tokenizer_2(folder: str | os.PathLike | None = None):
    """SDXL's second tokenizer: an SDXL folder's ``tokenizer_2/``, or the packaged OpenAI CLIP
    BPE with SDXL's tokenizer_2 settings (pad token "!", id 0; 77 tokens)."""
    if folder is None:
        return _packaged_tokenizer(pad_token=SDXL_TOKENIZER_2_PAD)
    return load_tokenizer(folder)


@dataclasses.dataclass
class StableDiffusion:
    """The networks and settings of one Stable Diffusion (1.x, 2.x) or SDXL folder.

    SDXL adds ``text_encoder_2`` (with its projection: the pooled embedding), ``tokenizer_2``
    and ``force_zeros_for_empty_prompt`` (classifier-free guidance without a negative prompt
    uses zero embeddings rather than the encoded empty prompt; SDXL base sets it).
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: Any
    scheduler_config: dict
    text_encoder_2: CLIPTextModel | None = None
    tokenizer_2: Any = None
    force_zeros_for_empty_prompt: bool = False

    @property
    def is_xl(self) -> bool:
        """Whether this is an SDXL pipeline (two text encoders)."""
        return self.text_encoder_2 is not None


def _model_index(folder: Path) -> dict[str, Any]:
    path = folder / "model_index.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointFolderError(f"{path} is not valid JSON ({e})") from e


def _is_xl_folder(folder: Path, index: dict[str, Any]) -> bool:
    name = str(index.get("_class_name") or "")
    return (folder / "text_encoder_2").is_dir() or name.startswith("StableDiffusionXL")


def load_stable_diffusion(
    folder: str | os.PathLike,
    *,
    dtype: jnp.dtype = jnp.float32,
    attention: str = "auto",
    remat: bool = False,
    variant: str | None = None,
    **unet_kwargs,
) -> StableDiffusion:
    """Every network of a diffusers Stable Diffusion or SDXL folder (``save_pretrained``
    layout); ``unet_kwargs`` go to :func:`load_unet` (e.g. a ``cross_attention_cls`` and its
    ``skip``).

    An SDXL folder (one with ``text_encoder_2/``, or whose ``model_index.json`` names a
    ``StableDiffusionXL*`` pipeline) also gives ``text_encoder_2`` (with its projection),
    ``tokenizer_2`` and ``force_zeros_for_empty_prompt`` (diffusers' default, True, when the
    index does not say). ``variant`` (e.g. "fp16") chooses the weight files of every subfolder;
    parameters are ``dtype`` whatever the files hold.
    """
    folder = Path(folder)
    index = _model_index(folder)
    xl = _is_xl_folder(folder, index)
    expected = SDXL_SUBFOLDERS if xl else SD_SUBFOLDERS
    missing = [s for s in expected if not (folder / s).is_dir()]
    if missing:
        what, pipeline = ("an SDXL", SDXL_PIPELINE) if xl else ("a Stable Diffusion", SD_PIPELINE)
        refiner = (
            " An SDXL refiner (text_encoder_2 only, 5 time ids with an aesthetic score) is not "
            "supported: use the base model's folder."
            if xl and missing == ["text_encoder"]
            else ""
        )
        raise CheckpointFolderError(
            f"{folder} is not {what} folder: missing subfolders {missing}; expected "
            f"{list(expected)} (diffusers' {pipeline}.save_pretrained).{refiner}"
        )
    sched = folder / "scheduler" / "scheduler_config.json"
    if not sched.is_file():
        raise CheckpointFolderError(f"{sched} is missing")
    kw = dict(dtype=dtype, attention=attention, variant=variant)
    text_encoder_2 = tokenizer_2 = None
    if xl:
        text_encoder_2 = load_clip_text(folder / "text_encoder_2", **kw)
        if not text_encoder_2.with_projection:
            raise CheckpointFolderError(
                f"{folder / 'text_encoder_2'} has no text projection: SDXL's text encoder 2 is a "
                "transformers CLIPTextModelWithProjection (its projected EOS state is the pooled "
                "embedding)"
            )
        tokenizer_2 = load_tokenizer_2(folder / "tokenizer_2")
    return StableDiffusion(
        unet=load_unet(folder / "unet", remat=remat, **kw, **unet_kwargs),
        vae=load_vae(folder / "vae", remat=remat, **kw),
        text_encoder=load_clip_text(folder / "text_encoder", **kw),
        tokenizer=load_tokenizer(folder / "tokenizer"),
        scheduler_config=json.loads(sched.read_text()),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        # An SDXL pipeline's flag only: StableDiffusionPipeline has no such behaviour.
        force_zeros_for_empty_prompt=xl and bool(index.get("force_zeros_for_empty_prompt", True)),
    )


# ----------------------------------------------------------------------------------- export


def _write(folder: Path, config: dict, tensors: Mapping[str, LazyTensor], weights: str) -> Path:
    """config.json and the weights, streamed (sharded past 10 GiB: SDXL's fp32 UNet)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    write_sharded_safetensors(folder, weights, tensors, {"format": "pt"})
    return folder


def save_unet(unet: UNet2DConditionModel, folder: str | os.PathLike) -> Path:
    """Write a folder that diffusers' ``UNet2DConditionModel.from_pretrained`` loads."""
    return _write(
        Path(folder),
        unet.config.to_diffusers(),
        export_lazy(unet),
        DIFFUSERS_WEIGHTS,
    )


def save_vae(vae: AutoencoderKL, folder: str | os.PathLike) -> Path:
    """Write a folder that diffusers' ``AutoencoderKL.from_pretrained`` loads."""
    return _write(
        Path(folder),
        vae.config.to_diffusers(),
        export_lazy(vae),
        DIFFUSERS_WEIGHTS,
    )


def _clip_export(model, prefix: str, arch: str, folder: Path) -> Path:
    # transformers writes the tower prefix only for the *WithProjection classes.
    proj = getattr(model, "with_projection", False)
    config = dict(model.config.to_hf(), architectures=[arch + ("WithProjection" if proj else "")])
    tensors = export_lazy(model, CLIP_RULES)
    if proj:
        tensors = {
            (k if k.endswith("projection.weight") else prefix + k): v for k, v in tensors.items()
        }
    return _write(folder, config, tensors, "model")


def save_clip_text(model: CLIPTextModel, folder: str | os.PathLike) -> Path:
    """Write a folder that transformers' ``CLIPTextModel[WithProjection]`` loads."""
    return _clip_export(model, "text_model.", "CLIPTextModel", Path(folder))


def save_clip_vision(model: CLIPVisionModel, folder: str | os.PathLike) -> Path:
    """Write a folder that transformers' ``CLIPVisionModel[WithProjection]`` loads."""
    return _clip_export(model, "vision_model.", "CLIPVisionModel", Path(folder))


def _text_class(model: CLIPTextModel) -> str:
    return "CLIPTextModel" + ("WithProjection" if model.with_projection else "")


def save_stable_diffusion(sd: StableDiffusion, folder: str | os.PathLike) -> Path:
    """Write a diffusers Stable Diffusion or SDXL folder (``from_pretrained``-loadable by
    ``StableDiffusionPipeline`` or, for ``sd.is_xl``, ``StableDiffusionXLPipeline``)."""
    folder = Path(folder)
    save_unet(sd.unet, folder / "unet")
    save_vae(sd.vae, folder / "vae")
    save_clip_text(sd.text_encoder, folder / "text_encoder")
    sd.tokenizer.save_pretrained(str(folder / "tokenizer"))
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    sched = dict(sd.scheduler_config)
    sched.setdefault("_class_name", "DDIMScheduler")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
    index: dict[str, Any] = {
        "_class_name": SDXL_PIPELINE if sd.is_xl else SD_PIPELINE,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", _text_class(sd.text_encoder)],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", sched["_class_name"]],
    }
    if sd.is_xl:
        if not sd.text_encoder_2.with_projection:
            raise ValueError("SDXL's text_encoder_2 must have its text projection")
        if sd.tokenizer_2 is None:
            raise ValueError("an SDXL pipeline (text_encoder_2 set) needs its tokenizer_2")
        save_clip_text(sd.text_encoder_2, folder / "text_encoder_2")
        sd.tokenizer_2.save_pretrained(str(folder / "tokenizer_2"))
        index.update(
            text_encoder_2=["transformers", _text_class(sd.text_encoder_2)],
            tokenizer_2=["transformers", "CLIPTokenizer"],
            image_encoder=[None, None],
            feature_extractor=[None, None],
            force_zeros_for_empty_prompt=sd.force_zeros_for_empty_prompt,
        )
    else:
        index.update(
            safety_checker=[None, None],
            feature_extractor=[None, None],
            requires_safety_checker=False,
        )
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder

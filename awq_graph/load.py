"""Load: a local Hugging Face checkpoint folder or a .gguf file -> (model, tokenizer)."""
from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import check_loading_info, check_stored, integer_floats
from .core.errors import InputError, first_paragraph
from .weights import check_finite_tensor

log = logging.getLogger(__name__)


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def load_model(path: str | Path):
    """Returns (model in float32 eval mode, tokenizer or None when the folder has none: only
    calibration from text, eval and generate need one). Nothing is fetched from a hub."""
    return load_float_model(path), load_tokenizer(path)


def load_float_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """The whole model, in float32 (or ``dtype``) eval mode (transformers' loading)."""
    model, _ = load_checked_model(path, dtype)
    return model


def load_checked_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """(the whole model in ``dtype`` eval mode, notes on the checkpoint's tensors left unread):
    transformers' loading, whose own report (missing, mismatched and unexpected tensors) is read
    by ``checkpoint.check_loading_info`` rather than silenced; a float parameter stored as integers
    is refused before loading (transformers would cast them)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    folder, kwargs = checkpoint_location(path)
    stored = None  # safetensors headers, each checked before transformers allocates anything
    if path.is_dir() and ((path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists()):
        from .weights import SafetensorsWeights

        stored = SafetensorsWeights(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, info = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype,
                                                               output_loading_info=True, ignore_mismatched_sizes=True,
                                                               **kwargs)
    except Exception as exc:
        raise InputError(f"could not load {path}: {first_paragraph(exc)}") from exc
    where = f"the checkpoint {path}"
    notes = check_loading_info(info, model, where)
    if stored is not None and not getattr(model.config, "quantization_config", None):
        stored_as_integers = integer_floats(stored, model)
        if stored_as_integers:
            name = stored_as_integers[0]
            raise InputError(f"tensor '{name}' in {where} is stored as integers, and the model's parameter is "
                             "floating point: a quantized checkpoint needs the quantization_config that says how to "
                             "read it (none in config.json)")
    return model.eval(), notes


FITS = 0.8  # of the memory available: what a whole model may take, the rest for activations and the runtime


def eval_dtype(path: str | Path, asked: str = "auto", available: int | None = None) -> tuple[torch.dtype, str | None]:
    """The dtype ``eval MODEL`` runs the float baseline in, and a note when it is not float32:
    "float32", "stored" (the checkpoint's own dtype, from its safetensors headers), or "auto":
    float32 when its float32 copy takes at most ``FITS`` of the memory available (``available``
    bytes, default MemAvailable), else the stored dtype. A GGUF file is dequantized to float32."""
    path = Path(path)
    if asked == "float32" or path.suffix == ".gguf" or not path.is_dir():
        return torch.float32, None
    from .weights import SafetensorsWeights

    try:
        weights = SafetensorsWeights(path)
    except InputError:
        return torch.float32, None  # not safetensors: transformers' loading says what is wrong
    by_dtype: dict[torch.dtype, int] = {}  # floating dtype -> elements stored in it
    for name in weights.names():
        if weights.dtype(name).is_floating_point:
            by_dtype[weights.dtype(name)] = by_dtype.get(weights.dtype(name), 0) + weights.numel(name)
    stored = max(by_dtype, key=by_dtype.get, default=torch.float32)
    if stored == torch.float32:
        return torch.float32, None
    if asked == "stored":
        return stored, f"eval: running {path.name} in {str(stored).removeprefix('torch.')}, its stored dtype (`dtype=stored`)"
    elements = sum(by_dtype.values())
    available = available if available is not None else _mem_available()
    if available is None or 4 * elements <= FITS * available:
        return torch.float32, None
    return stored, (f"eval: {path.name} in float32 takes {4 * elements / 2**30:.1f} GiB, more than "
                    f"{FITS:.0%} of the {available / 2**30:.1f} GiB available: running in "
                    f"{str(stored).removeprefix('torch.')}, its stored dtype (`dtype=float32` to insist)")


def sampler_dtype(path: str | Path, available: int | None = None) -> tuple[torch.dtype, str | None]:
    """The dtype the whole model is loaded in to sample calibration text (``calib="self"``), and a
    note when it is not float32: float32 where that copy fits (``eval_dtype``'s "auto"), else the
    checkpoint's stored dtype (an 8B model: 16 GB in bfloat16 against 32 GB)."""
    dtype, _ = eval_dtype(path, "auto", available)
    if dtype == torch.float32:
        return dtype, None
    return dtype, (f"calibration 'self' samples its text with {Path(path).name} in {str(dtype).removeprefix('torch.')}, "
                   f"its stored dtype: its float32 copy would take more than {FITS:.0%} of the memory available "
                   "(the search itself runs in float32, a layer at a time)")


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def checkpoint_location(path: Path) -> tuple[Path, dict]:
    """(the folder transformers reads, its keyword arguments) for a checkpoint folder or a .gguf
    file, after checking that it is one."""
    if not path.exists():
        raise InputError(f"model path {path} does not exist (give a checkpoint folder or a .gguf file)")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise InputError(f"model file {path} is not a .gguf file (give a checkpoint folder or a .gguf file)")
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise InputError(f"model file {path} is not a GGUF file: it does not start with the GGUF magic bytes")
        return path.parent, {"gguf_file": path.name}
    if not (path / "config.json").exists():
        raise InputError(f"model folder {path} has no config.json: not a Hugging Face checkpoint")
    if not any((path / name).exists() for name in WEIGHT_FILES):
        raise InputError(f"model folder {path} has no weights (none of {', '.join(WEIGHT_FILES)})")
    return path, {}


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer, or None when it has none. Tokenizer files that do not load are
    a damaged checkpoint, said so by name (not "no tokenizer", nor a folder written without one)."""
    from transformers import AutoTokenizer

    folder, kwargs = checkpoint_location(Path(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
    except Exception as exc:
        present = sorted(p.name for p in folder.glob("tokenizer*")) if not kwargs else []
        if present:
            raise InputError(f"the tokenizer in {folder} ({', '.join(present)}) cannot be loaded: "
                             f"{first_paragraph(exc)[:200]}") from exc
        log.info("no tokenizer in %s: %s", folder, first_paragraph(exc))
        return None


@dataclass
class Skeleton:
    """A checkpoint opened for a streaming compile: the model built on the meta device (its
    parameters have shapes and no data; its buffers, the rotary tables, are real), and where each
    parameter's values are (``weights``: one tensor at a time; ``aliases``: tied names)."""

    model: torch.nn.Module
    weights: object  # SafetensorsWeights or GGUFWeights: names(), get(name)
    aliases: dict[str, str]
    notes: list[str] = field(default_factory=list)  # the checkpoint's tensors left unread (``check_stored``)


def open_skeleton(path: str | Path) -> tuple[Skeleton | None, str | None]:
    """(the skeleton, None), or (None, why this checkpoint is loaded whole instead): a streaming
    compile reads every parameter by its own name, so a checkpoint whose tensors transformers
    renames, converts or dequantizes on loading (``pytorch_model.bin``, pre-quantized weights, a
    missing tensor) is loaded as today."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    folder, kwargs = checkpoint_location(path)
    if not (path.is_file() or (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists()):
        return None, "the checkpoint is not in safetensors or GGUF"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = AutoConfig.from_pretrained(folder, local_files_only=True, **kwargs)
            refuse_quantized(path, config)
            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except Exception as exc:
        raise InputError(f"could not load {path}: {first_paragraph(exc)}") from exc
    if path.is_file():
        from .gguf_weights import GGUFWeights

        try:
            weights = GGUFWeights(path, model)
        except Exception as exc:  # the gguf reader's errors on a damaged file are IndexError, ValueError, ...
            raise InputError(f"could not load {path}: {first_paragraph(exc)}") from exc
    else:
        from .weights import SafetensorsWeights

        weights, why = _under_model_names(SafetensorsWeights(path), model)
        if weights is None:
            return None, why
    model.tie_weights()
    model.eval()
    stored = set(weights.names())
    canonical: dict[int, str] = {}
    aliases: dict[str, str] = {}
    params = list(model.named_parameters(remove_duplicate=False))
    for name, param in params:
        if name in stored:
            canonical.setdefault(id(param), name)
    for name, param in params:
        if name not in stored and id(param) in canonical:
            aliases[name] = canonical[id(param)]
    missing = [name for name, _ in params if name not in stored and name not in aliases]
    if len(missing) > len(params) // 2:  # other names altogether: transformers' loading knows more renamings
        return None, f"the checkpoint's tensors are not under the model's parameter names ('{missing[0]}', ...)"
    shapes = {name: (getattr(weights, "shape", lambda n: None)(name), getattr(weights, "dtype", lambda n: None)(name))
              for name in stored}
    notes = check_stored(shapes, model, aliases, f"the checkpoint {path}")
    return Skeleton(model, weights, aliases, notes), None


def refuse_quantized(path: Path, config=None) -> None:
    """compile quantizes a float checkpoint: one whose config has a quantization_config (a
    compressed-tensors folder, our own export_hf output, GPTQ, AWQ, bitsandbytes) is refused by
    name rather than failing later in torch.export."""
    if config is None:
        from transformers import AutoConfig

        folder, kwargs = checkpoint_location(path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = AutoConfig.from_pretrained(folder, local_files_only=True, **kwargs)
        except Exception as exc:
            raise InputError(f"could not load {path}: {first_paragraph(exc)}") from exc
    quantization = getattr(config, "quantization_config", None)
    if quantization:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else \
            getattr(quantization, "quant_method", None)
        raise InputError(f"{path} is quantized already (config.json's quantization_config, quant_method "
                         f"{getattr(method, 'value', method)}): compile the float checkpoint it was made from")


def _natural(key: str) -> tuple:
    """Sort key: the numbers in a name as numbers (expert 2 before expert 10)."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key))


def _under_model_names(weights, model):
    """(the checkpoint's tensors under the model's parameter names, None), or (None, why not):
    transformers' conversion mapping for the model (what its loader renames, and the experts it
    merges into banks: one tensor per expert, and per gate and up, in Mixtral's, Qwen-MoE's and
    OLMoE's checkpoints) applied to the names; ``RenamedWeights`` reads the tensors so. A
    conversion other than renaming and merging experts (a transpose, a split) is not streamed."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter, WeightRenaming, rename_source_key

    from .weights import RenamedWeights

    try:
        transforms = get_model_conversion_mapping(model) or []
    except Exception as exc:  # transformers' own lookup; the checkpoint can still be loaded whole
        return None, f"transformers' conversion mapping for {type(model).__name__} failed: {first_paragraph(exc)}"
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    meta = model.state_dict()
    renamed, sources = {}, {}
    for key in weights.names():
        target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        if pattern is None:
            if target != key:
                renamed[target] = key
            continue
        converter = next(c for c in converters if pattern in c.source_patterns)
        ops = [(type(op), getattr(op, "dim", None)) for op in converter.operations]
        if ops not in ([(MergeModulelist, 0)], [(MergeModulelist, 0), (Concatenate, 1)]):
            steps = ", ".join(type(op).__name__ for op in converter.operations)
            return None, f"transformers converts the checkpoint's '{key}' on loading ({steps})"
        sources.setdefault(target, (converter, {}))[1].setdefault(pattern, []).append(key)
    merged = {}
    for target, (converter, by_pattern) in sources.items():
        parts = [sorted(by_pattern.get(p, []), key=_natural) for p in converter.source_patterns]
        if target not in meta or not all(parts) or len({len(p) for p in parts}) != 1:
            return None, f"the checkpoint's tensors merged into '{target}' do not make one bank"
        merged[target] = parts
    if not renamed and not merged:
        return weights, None
    renamed_weights = RenamedWeights(weights, renamed, merged)
    for target in merged:
        if renamed_weights.shape(target) != tuple(meta[target].shape):
            return None, (f"the checkpoint's experts merge into {renamed_weights.shape(target)} for '{target}', "
                          f"the model's config makes it {tuple(meta[target].shape)}")
    return renamed_weights, None


def tokenizer_files(model_path: str | Path) -> str:
    """That the checkpoint (folder, or the folder of a .gguf) has no tokenizer, and what one needs."""
    path = Path(model_path)
    folder = path.parent if path.is_file() else path
    return f"{folder} has no tokenizer (tokenizer.json, or tokenizer_config.json with its vocabulary files)"


TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=320, max_position_embeddings=512,
                  num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                  shared_expert_intermediate_size=64, sliding_window=16, n_positions=512,
                  # rotary on part of a head (gpt-j, codegen), multi-head latent attention (deepseek)
                  rotary_dim=8, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, kv_lora_rank=32,
                  q_lora_rank=48,
                  # sparse attention (deepseek v3.2): fewer keys kept than a short check sees
                  index_topk=4)


def check_finite(model) -> None:
    """Fail with one line naming the first parameter that holds NaN or inf (``check_finite_tensor``).
    (Buffers may hold -inf on purpose: attention masks.)"""
    for name, tensor in model.named_parameters():
        if tensor.is_floating_point() and tensor.device.type != "meta":
            check_finite_tensor(name, tensor)


def _tiny_fields(config) -> dict:
    """The fields of ``config`` that TINY_SHAPE shrinks, and its special token ids moved inside the tiny vocab."""
    shape = {k: v for k, v in TINY_SHAPE.items() if _has(config, k) or k in getattr(config, "attribute_map", {})}
    if "kv_lora_rank" in shape and "num_key_value_heads" in shape:  # latent attention: keys have every head
        shape["num_key_value_heads"] = shape.get("num_attention_heads", TINY_SHAPE["num_attention_heads"])
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(config, key, None) if _has(config, key) else None
        if isinstance(value, int) and value >= TINY_SHAPE["vocab_size"]:
            shape[key] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}[key]
    return shape


def _with_an_attention_layer(config, shape: dict, most: int = 5) -> dict:
    """A hybrid whose first layers are all linear attention (Qwen3-Next: three of four) keeps as
    many layers as reach its first attention layer: with none, transformers' own forward cannot
    count the cached positions, and the tiny model would not be the architecture."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    kinds = getattr(text, "layer_types", None) if _has(text, "layer_types") else None
    layers = shape.get("num_hidden_layers")
    if not isinstance(kinds, (list, tuple)) or layers is None:
        return {}
    attention = [i for i, kind in enumerate(kinds) if isinstance(kind, str) and "attention" in kind and "linear" not in kind]
    if not attention or attention[0] < layers or attention[0] >= most or not any("linear" in str(k) or k == "conv" for k in kinds[:layers]):
        return {}
    return {"num_hidden_layers": attention[0] + 1}


TINY_EXTRA = dict(decoder_attention_heads=4, encoder_attention_heads=4, num_decoder_layers=2, num_encoder_layers=2)


def _repaired(config, shape: dict) -> dict:
    """``shape`` made consistent with the rest of ``config``: fields that are read-only properties
    dropped; a per-layer ``layer_types`` list cut to two layers of each kind (their first
    occurrences, twice) with the layer count to match, and gpt-neo's ``attention_types`` pattern
    likewise; a state-space mixer's head count and size made to span its expanded width; the
    encoder-decoder head and layer counts shrunk too."""
    fields = {k: v for k, v in shape.items() if not _read_only(config, k)}
    fields.update({k: v for k, v in TINY_EXTRA.items() if _has(config, k) and not _read_only(config, k)})
    if all(_has(config, k) for k in ("expand", "num_heads", "head_dim")) and "hidden_size" in fields:
        # a state-space mixer (mamba2): its heads times their size span the expanded width
        fields.update(num_heads=4, head_dim=fields["hidden_size"] * int(config.expand) // 4)
    pattern = getattr(config, "attention_types", None) if _has(config, "attention_types") else None
    if isinstance(pattern, list) and pattern and isinstance(pattern[0], (list, tuple)) and "num_hidden_layers" in fields:
        kinds = list(pattern[0][0])  # gpt-neo: [[kinds, repeats]]: the kinds once each
        fields.update(attention_types=[[kinds, 1]], num_hidden_layers=len(kinds))
    if "num_decoder_layers" in fields:  # an encoder-decoder counts its layers per side
        fields.pop("num_hidden_layers", None)
    kinds = getattr(config, "layer_types", None) if _has(config, "layer_types") else None
    if isinstance(kinds, (list, tuple)) and kinds and "num_hidden_layers" in fields \
            and not _read_only(config, "layer_types"):
        firsts = [kind for i, kind in enumerate(kinds) if kind not in kinds[:i]] * 2  # weights shared by kind need two
        fields.update(layer_types=firsts, num_hidden_layers=len(firsts))
    return fields


def _read_only(config, field: str) -> bool:
    attr = getattr(type(config), field, None)
    return isinstance(attr, property) and attr.fset is None


def _has(config, field: str) -> bool:
    """``hasattr``, for configs that refuse some reads with an error of their own (a per-layer field)."""
    try:
        return hasattr(config, field)
    except Exception:
        return False


def tiny_random_model(model_type: str, seed: int = 0, **overrides):
    """A shrunk random model of a transformers architecture, built offline from its config
    (``overrides``: config fields to set besides the shrinking).

    One-dimensional parameters (norm weights, biases) get noise, so that a wrong fold of a
    scale into them shows in the logits.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise InputError(f"'{model_type}' is neither a path nor a transformers model type "
                         f"(e.g. llama, qwen2, gemma2, phi3, gpt2, mixtral)")
    defaults = AutoConfig.for_model(model_type)
    shape = _tiny_fields(defaults)
    for name in getattr(defaults, "sub_configs", {}) or {}:  # a composite model's text, vision, ... configs
        sub = getattr(defaults, name, None)
        if sub is not None and hasattr(sub, "to_dict") and name not in overrides:
            shape[name] = _tiny_fields(sub)
    if getattr(defaults, "is_decoder", None) is False and not getattr(defaults, "is_encoder_decoder", False):
        # an encoder architecture's causal LM (BertLMHeadModel): causal, with a cache, only as a
        # decoder, which its checkpoints for generation say; its config defaults to an encoder
        shape["is_decoder"] = True
    # the plain shrink (what every golden was made with), reaching a hybrid's first attention
    # layer first where it needs more layers for one, then one that also repairs the fields a
    # config checks against the ones shrunk
    attempts = [shape, _repaired(defaults, shape)]
    longer = _with_an_attention_layer(defaults, shape)
    if longer:
        attempts.insert(0, {**shape, **longer})
    attempts = [fields for i, fields in enumerate(attempts) if fields not in attempts[:i]]
    for attempt, fields in enumerate(attempts):
        try:
            config = AutoConfig.for_model(model_type, **{**fields, **overrides})
            with torch.random.fork_rng(devices=[]):  # from_config draws from the global RNG: the caller's is kept
                torch.manual_seed(seed)
                model = AutoModelForCausalLM.from_config(config)
            break
        except Exception as exc:
            if attempt == len(attempts) - 1:
                raise InputError(f"could not build a tiny '{model_type}' causal LM: {first_paragraph(exc)}") from exc
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.empty(p.shape).uniform_(-0.3, 0.3, generator=gen))
    return model.eval()

"""The records the stages hand each other: scaling groups (and the sources that could not be
one), the kinds of fold point, and their projection to AMD Quark's AWQ config format.

A ScalingGroup is frozen data (names and integers): the source module whose output channels
take ``1/s``, the linears whose input columns take ``s``, and for each linear the channel map
``map[c]`` = the source channel its input channel ``c`` reads. The Quark config is the
per-decoder-layer template of these records:

    {"model_decoder_layers": "model.layers",
     "scaling_layers": [{"prev_op": "input_layernorm",
                         "layers": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                         "inp": "self_attn.q_proj", "module2inspect": "self_attn"}, ...]}
"""
from __future__ import annotations

import enum
import json
from dataclasses import dataclass

from .errors import ConfigError


class FoldKind(str, enum.Enum):
    """Where a group's ``1/s`` goes: the cases of ``awq_graph.passes.fold``."""

    NORM_WEIGHT = "norm_weight"  # Case A: x_hat * w            -> w / s
    NORM_OFFSET = "norm_offset"  # Case B: x_hat * (1 + w)      -> (1 + w) / s - 1
    LAYER_NORM = "layer_norm"  # Case C: aten.layer_norm w, b -> w / s, b / s
    LINEAR = "linear"  # Case D: a linear's rows (out, in) and bias
    LINEAR_T = "linear_t"  # Case D for a Conv1D weight stored (in, out): its columns are the rows

    @property
    def norm_offset(self) -> float:
        """The constant the norm adds to its weight before multiplying: 1 for Case B, else 0."""
        return 1.0 if self is FoldKind.NORM_OFFSET else 0.0


def common_module(paths) -> str:
    """Smallest module containing all ``paths`` (the layer itself for one path)."""
    parts = [p.split(".") for p in paths]
    prefix = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        prefix.append(items[0])
    return ".".join(prefix)


def map_kind(cmap: tuple[int, ...], channels: int) -> str:
    if list(cmap) == list(range(channels)):
        return "identity"
    if list(cmap) == list(range(cmap[0], cmap[0] + len(cmap))):
        return f"slice[{cmap[0]}:{cmap[0] + len(cmap)}]"
    if len(cmap) > channels and len(cmap) % channels == 0:
        return f"repeat x{len(cmap) // channels} (grouped heads)"
    return "gather"


@dataclass(frozen=True)
class ScalingGroup:
    prev_op: str  # module path of the fold point
    prev_kind: FoldKind
    prev_params: tuple[str, ...]
    channels: int  # source channels = length of s
    layers: tuple[str, ...]
    channel_maps: tuple[tuple[int, ...], ...]  # per layer, len = its in_features
    inp: str
    module2inspect: str

    @classmethod
    def build(cls, prev_op, prev_kind, prev_params, channels, layers, maps, inp=None, module2inspect=None):
        layers = tuple(layers)
        return cls(prev_op, FoldKind(prev_kind), tuple(prev_params), int(channels), layers,
                   tuple(tuple(maps[name]) for name in layers), inp or layers[0],
                   module2inspect if module2inspect is not None else common_module(layers))

    def channel_map(self, layer: str) -> tuple[int, ...]:
        return self.channel_maps[self.layers.index(layer)]

    def column_scale(self, s, layer: str):
        """The scale of ``layer``'s input columns: the group's scale ``s`` (a tensor over its
        source channels) read through the layer's channel map."""
        return s[list(self.channel_map(layer))]

    @property
    def inspects_one_linear(self) -> bool:
        """Its loss is the output error of its single linear (no subgraph to run)."""
        return len(self.layers) == 1 and self.module2inspect == self.layers[0]

    def used_channels(self) -> list[int]:
        """Source channels some layer reads; the others keep s = 1."""
        return sorted({c for m in self.channel_maps for c in m})

    def kinds(self) -> list[str]:
        return [map_kind(m, self.channels) for m in self.channel_maps]

    def to_json(self) -> dict:
        """Names, integers and strings only: ``from_json(to_json())`` is the same group."""
        return {"prev_op": self.prev_op, "prev_kind": self.prev_kind.value, "prev_params": list(self.prev_params),
                "channels": self.channels, "layers": list(self.layers),
                "channel_maps": [list(m) for m in self.channel_maps], "inp": self.inp,
                "module2inspect": self.module2inspect}

    @classmethod
    def from_json(cls, data: dict) -> "ScalingGroup":
        return cls(data["prev_op"], FoldKind(data["prev_kind"]), tuple(data["prev_params"]), int(data["channels"]),
                   tuple(data["layers"]), tuple(tuple(m) for m in data["channel_maps"]), data["inp"],
                   data["module2inspect"])


@dataclass(frozen=True)
class SkippedGroup:
    prev_op: str
    layers: tuple[str, ...]
    reason: str

    def to_json(self) -> dict:
        return {"prev_op": self.prev_op, "layers": list(self.layers), "reason": self.reason}


def _relative(path: str, layer_prefix: str) -> str:
    return path[len(layer_prefix) + 1:] if path.startswith(layer_prefix + ".") else path


def to_quark_config(groups: list[ScalingGroup], decoder_layers: str, n_layers: int) -> dict:
    """Project groups of decoder layer 0 to Quark's per-layer template."""
    prefix0 = f"{decoder_layers}.0"
    entries = []
    for g in groups:
        if not g.prev_op.startswith(prefix0 + "."):
            continue
        entry = {"prev_op": _relative(g.prev_op, prefix0),
                 "layers": [_relative(x, prefix0) for x in g.layers],
                 "inp": _relative(g.inp, prefix0)}
        if len(g.layers) > 1 or g.module2inspect != g.layers[0]:
            entry["module2inspect"] = _relative(g.module2inspect, prefix0)
        entries.append(entry)
    return {"name": "awq", "model_decoder_layers": decoder_layers, "num_decoder_layers": n_layers,
            "scaling_layers": entries}


def read_quark_config(path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder, not a JSON file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    # Quark nests the AWQ algorithm config; accept the AWQ part or the whole.
    if isinstance(cfg, dict) and "algo_config" in cfg:
        algo = cfg["algo_config"]
        algo = algo[0] if isinstance(algo, list) and algo else algo
        cfg = algo
    if not isinstance(cfg, dict):
        raise ConfigError(f"config {path}: a Quark AWQ config is a JSON object, and this holds a {type(cfg).__name__}")
    for key in ("model_decoder_layers", "scaling_layers"):
        if key not in cfg:
            raise ConfigError(f"config {path}: missing key '{key}' (Quark AWQ format)")
    if not isinstance(cfg["scaling_layers"], list):
        raise ConfigError(f"config {path}: 'scaling_layers' must be a list")
    for i, entry in enumerate(cfg["scaling_layers"]):
        if not isinstance(entry, dict):
            raise ConfigError(f"config {path}: scaling_layers[{i}] is a {type(entry).__name__}, not an object with "
                              "prev_op, layers and inp")
        for key in ("prev_op", "layers", "inp"):
            if key not in entry:
                raise ConfigError(f"config {path}: scaling_layers[{i}] is missing '{key}'")
        if not (isinstance(entry["layers"], list) and all(isinstance(x, str) for x in entry["layers"])):
            raise ConfigError(f"config {path}: scaling_layers[{i}]'s 'layers' must be a list of module names")
    return cfg

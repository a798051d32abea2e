"""Trust the input: a damaged or mismatched checkpoint is refused by name before any long work,
never compiled with made-up weights; each fault is one ``awq-graph: error:`` line, with nothing
left beside OUT and the input untouched."""
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from awq_graph.cli import main

FAST = ["--rtn", "--group-size", "16"]


def _tree(folder: Path) -> dict:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + size]), raw[8 + size:]


def _write(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _copy(checkpoint: Path, tmp_path: Path, name: str = "model") -> Path:
    folder = tmp_path / name
    shutil.copytree(checkpoint, folder)
    return folder


def _config(folder: Path, **fields) -> Path:
    config = json.loads((folder / "config.json").read_text())
    config.update(fields)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _tensors(folder: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    tensors = edit(load_file(folder / "model.safetensors"))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _edit_header(folder: Path, edit) -> Path:
    header, data = _header(folder / "model.safetensors")
    edit(header)
    _write(folder / "model.safetensors", header, data)
    return folder


def _sharded_without(folder: Path, tensor: str) -> Path:
    """The checkpoint in shards of ~50 KB, ``tensor`` taken out of its shard (the index still names it)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder, max_shard_size="50KB")
    (folder / "model.safetensors").unlink(missing_ok=True)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"][tensor]
    tensors = load_file(shard)
    del tensors[tensor]
    save_file(tensors, shard, metadata={"format": "pt"})
    return folder


def _index_without_shards(folder: Path) -> Path:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    (folder / "model.safetensors").unlink()
    return folder


def _set(name, **fields):
    def edit(header):
        header[name].update(fields)
    return edit


def _drop(name, field):
    def edit(header):
        del header[name][field]
    return edit


UP = "model.layers.0.mlp.up_proj.weight"
DOWN = "model.layers.1.mlp.down_proj.weight"

DAMAGED = {
    "a tensor removed": (lambda f: _tensors(f, lambda t: {k: v for k, v in t.items() if k != DOWN}),
                         f"lacks 1 tensor(s) the model's config needs: '{DOWN}'"),
    "a tensor removed from the shard its index names": (lambda f: _sharded_without(f, DOWN), f"'{DOWN}'"),
    "config says 3 layers, weights hold 2": (lambda f: _config(f, num_hidden_layers=3),
                                             "the config says 3 layers under 'model.layers'"),
    "config says 1 layer, weights hold 2": (lambda f: _config(f, num_hidden_layers=1),
                                            "the config says 1 layer(s) under 'model.layers'"),
    "a float weight stored as I8": (lambda f: _tensors(f, lambda t: {**t, UP: t[UP].to(torch.int8)}),
                                    f"'{UP}'"),
    "a header shape of 64 x 1e9": (lambda f: _edit_header(f, _set(UP, shape=[64, 1_000_000_000])),
                                   "header says shape (64, 1000000000)"),
    "a header dtype its bytes disagree with": (lambda f: _edit_header(f, _set(UP, dtype="F16")), "header is damaged"),
    "a header without data_offsets": (lambda f: _edit_header(f, _drop(UP, "data_offsets")), "data_offsets"),
    "a header shape the config disagrees with": (lambda f: _edit_header(f, _set(UP, shape=[64, 128])),
                                                 f"tensor '{UP}'"),
    "an index with an empty weight_map": (_index_without_shards, "empty weight_map"),
}


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
@pytest.mark.parametrize("case", list(DAMAGED))
def test_a_damaged_or_mismatched_checkpoint_is_refused_by_name_and_left_untouched(
        tiny_checkpoint, tmp_path, capsys, case, stream):
    damage, culprit = DAMAGED[case]
    model = damage(_copy(tiny_checkpoint, tmp_path))
    before = _tree(model)
    out = tmp_path / "out"
    code = main(["compile", str(model), "-o", str(out), *FAST, *([] if stream else ["--no-stream"])])
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("awq-graph:")]
    assert code == 1, err
    assert len(ours) == 1 and ours[0].startswith("awq-graph: error:") and culprit in ours[0], err
    assert "Traceback" not in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert _tree(model) == before


def test_eval_of_a_checkpoint_missing_a_tensor_is_refused_not_run_with_random_weights(tiny_checkpoint, tmp_path, capsys):
    model = DAMAGED["a tensor removed"][0](_copy(tiny_checkpoint, tmp_path))
    text = tmp_path / "text.txt"
    text.write_text("the cat of the city is 3 and more text " * 20)
    assert main(["eval", str(model), "--text", str(text)]) == 1
    err = capsys.readouterr().err
    assert f"'{DOWN}'" in err and err.count("awq-graph: error:") == 1 and "Traceback" not in err, err


def test_a_tensor_the_model_has_no_place_for_is_compiled_around_with_a_warning_naming_it(tiny_checkpoint, tmp_path,
                                                                                         capsys):
    model = _tensors(_copy(tiny_checkpoint, tmp_path), lambda t: {**t, "model.extra.scale": torch.ones(4)})
    out = tmp_path / "out"
    assert main(["compile", str(model), "-o", str(out), *FAST]) == 0
    err = capsys.readouterr().err
    assert "awq-graph: warning: 1 tensor(s) in the checkpoint" in err and "'model.extra.scale'" in err, err
    report = json.loads((out / "report.json").read_text())
    assert any("'model.extra.scale'" in w for w in report["warnings"])

"""A sharded safetensors checkpoint (the Hugging Face layout), read one tensor at a time.

A folder holds `config.json`, `model.safetensors.index.json` (`{"weight_map": {tensor
name: shard file}}`) and the shard files. Opening it validates the index against the
shards' own headers (nothing is loaded); `tensor(name)` reads one tensor; `meta_model()`
builds the architecture from `config.json` on the meta device (shapes, no values; no
remote code).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from .._errors import GaugeError
from ..io._hf import checkpoint_renaming, named_class

__all__ = ["INDEX", "ShardedCheckpoint", "is_sharded"]

#: the index file of a sharded safetensors checkpoint
INDEX = "model.safetensors.index.json"


def is_sharded(path: str | Path) -> bool:
    """Whether `path` is a folder holding a sharded safetensors checkpoint's index."""
    return Path(path).is_dir() and (Path(path) / INDEX).is_file()


class ShardedCheckpoint:
    """The validated index of a sharded checkpoint in `folder`.

    - `shards`: shard file names in index order, each with its tensor names (as the
      shard's header lists them).
    - `dtypes`, `shapes`: per tensor name, from the headers.
    - `stored`: model name → stored name, for a checkpoint whose names `transformers`
      renames on loading (`meta_model` sets it; empty otherwise). `weight_map`, `shards`,
      `dtypes` and `shapes` then use the model's names; `tensor` reads, and `ShardWriter`
      writes, the stored ones.

    Raises `GaugeError` for a missing or unreadable `config.json` or index, a `weight_map`
    that is not a mapping of names to shard files, a missing or unreadable shard, or an
    index that disagrees with the shards' headers.
    """

    def __init__(self, folder: str | Path) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise GaugeError(f"{self.folder} has no config.json: not a Hugging Face checkpoint")
        index = self.folder / INDEX
        try:
            data = json.loads(index.read_text())
        except (OSError, ValueError) as exc:
            raise GaugeError(f"{index} is not a readable JSON index: {exc}") from exc
        wmap = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wmap, dict) or not wmap:
            raise GaugeError(f"{index} has no weight_map (tensor name -> shard file)")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()):
            raise GaugeError(f"{index}: weight_map must map tensor names to shard file names")
        self.weight_map: dict[str, str] = dict(wmap)
        self.stored: dict[str, str] = {}
        self.shards: dict[str, list[str]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for shard in dict.fromkeys(wmap.values()):
            path = self.folder / shard
            if Path(shard).name != shard or not path.is_file():
                raise GaugeError(f"{index} names the shard {shard!r}, not a file in {self.folder}")
            try:
                with safe_open(str(path), framework="pt") as f:
                    names = list(f.keys())
                    for k in names:
                        sl = f.get_slice(k)
                        self.shapes[k] = tuple(sl.get_shape())
                        self.dtypes[k] = _DTYPES.get(sl.get_dtype(), torch.float32)
            except Exception as exc:
                raise GaugeError(f"{path} is not a readable safetensors file: {exc}") from exc
            listed = sorted(k for k, v in wmap.items() if v == shard)
            if sorted(names) != listed:
                extra = sorted(set(names) - set(listed))[:3]
                lost = sorted(set(listed) - set(names))[:3]
                raise GaugeError(
                    f"{index} disagrees with {shard}: in the shard but not the index {extra}, "
                    f"in the index but not the shard {lost}"
                )
            self.shards[shard] = names

    def tensor(self, name: str) -> Tensor:
        """The tensor `name`, read from its shard alone."""
        from safetensors import safe_open

        if name not in self.weight_map:
            raise GaugeError(f"the checkpoint in {self.folder} has no tensor {name!r}")
        with safe_open(str(self.folder / self.weight_map[name]), framework="pt") as f:
            return f.get_tensor(self.stored.get(name, name))

    def stored_name(self, name: str) -> str:
        """The name the checkpoint stores the model's tensor `name` under."""
        return self.stored.get(name, name)

    def meta_model(self) -> nn.Module:
        """The architecture of `config.json` on the meta device, in eval mode: the class
        its `architectures` names when `transformers` has it (a base model, an encoder, a
        causal LM, ...), else the causal LM of its model type; no remote code. Its
        state-dict names must be those of the checkpoint (tied weights may be stored once)."""
        try:
            from transformers import AutoConfig, AutoModelForCausalLM
        except ImportError as exc:
            raise GaugeError("reading a Hugging Face checkpoint needs transformers") from exc
        try:
            config = AutoConfig.from_pretrained(
                str(self.folder), trust_remote_code=False, local_files_only=True
            )
            cls = named_class(config)
            with torch.device("meta"):
                if cls is not None:
                    model = cls(config)
                else:
                    model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        except Exception as exc:
            raise GaugeError(f"cannot build the model of {self.folder}/config.json: {exc}") from exc
        model.eval()
        self._follow_renaming(model)
        self._check_names(model)
        return model

    def _follow_renaming(self, model: nn.Module) -> None:
        """Where the stored names are not the model's and `transformers` renames them on
        loading (`checkpoint_renaming`), read the checkpoint under the model's names."""
        if self.stored:
            return
        state = model.state_dict(keep_vars=True)
        if all(k in state for k in self.weight_map):
            return
        rename = checkpoint_renaming(model, list(self.weight_map))
        if rename is None or len(set(rename.values())) != len(rename):
            return
        self.stored = {v: k for k, v in rename.items()}
        self.weight_map = {rename[k]: v for k, v in self.weight_map.items()}
        self.shards = {s: [rename[k] for k in names] for s, names in self.shards.items()}
        self.shapes = {rename[k]: v for k, v in self.shapes.items()}
        self.dtypes = {rename[k]: v for k, v in self.dtypes.items()}

    def _check_names(self, model: nn.Module) -> None:
        state = model.state_dict(keep_vars=True)
        stored = set(self.weight_map)
        ids = {id(state[k]) for k in stored if k in state}
        missing = [k for k in state if k not in stored and id(state[k]) not in ids]
        extra = sorted(stored - set(state))
        if missing or extra:
            raise GaugeError(
                f"the checkpoint in {self.folder} does not match its config.json: missing "
                f"{missing[:3]}, unexpected {extra[:3]}"
            )
        for k in stored:
            if tuple(state[k].shape) != self.shapes[k]:
                raise GaugeError(
                    f"{k} has shape {self.shapes[k]} in the checkpoint, "
                    f"{tuple(state[k].shape)} in the model of config.json"
                )


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

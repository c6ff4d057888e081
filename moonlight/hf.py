"""The Hugging Face format of Moonlight checkpoints: key names, safetensors reading and writing.

The HF on-disk layout (Moonlight's released checkpoint, and what `save_pretrained` writes) keeps one
tensor per expert; the native model stacks them ([E, ...]). Everything else is a rename: weights copy
across without permutation because both sides rotate interleaved RoPE pairs.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from moonlight.config import ModelArgs
from moonlight.errors import CheckpointError, ConfigError
from moonlight.model import Moonlight
from moonlight.outputs import check_replaceable, publish_mode, remove_own_dir, staged_output

# native suffix (after "layers.N.") -> HF suffix (after "model.layers.N.")
_LAYER_RENAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.q_a_proj.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.q_b_proj.weight": "self_attn.q_b_proj.weight",
    "attn.kv_a_proj.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn.kv_b_proj.weight": "self_attn.kv_b_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "ffn.router.weight": "mlp.gate.weight",
    "ffn.router.expert_bias": "mlp.gate.e_score_correction_bias",
}
for _proj in ("gate_proj", "up_proj", "down_proj"):
    _LAYER_RENAMES[f"ffn.{_proj}.weight"] = f"mlp.{_proj}.weight"
    _LAYER_RENAMES[f"ffn.shared_experts.{_proj}.weight"] = f"mlp.shared_experts.{_proj}.weight"
_TOP_RENAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_EXPERT_STACK = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(gate_proj|up_proj|down_proj)$")
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
# HF keys that carry no weights of ours: the released checkpoint stores each layer's RoPE inv_freq.
_HF_PASSTHROUGH = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def progress(total: int, desc: str, unit: str = "tensor") -> tqdm:
    """A progress bar on stderr for long conversions (silent when stderr is not a terminal)."""
    return tqdm(total=total, desc=desc, unit=unit, disable=None)


def is_expert_stack(native_key: str) -> bool:
    """Whether a native tensor stacks the routed experts ([E, ...]; one HF key per expert)."""
    return _EXPERT_STACK.match(native_key) is not None


def hf_keys(native_key: str, args: ModelArgs) -> list[str]:
    """The HF key(s) holding one native tensor: one per expert for stacked expert weights."""
    if native_key in _TOP_RENAMES:
        return [_TOP_RENAMES[native_key]]
    m = _EXPERT_STACK.match(native_key)
    if m:
        layer, proj = m.groups()
        return [f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight" for e in range(args.n_routed_experts)]
    m = _LAYER.match(native_key)
    if m and m.group(2) in _LAYER_RENAMES:
        return [f"model.layers.{m.group(1)}.{_LAYER_RENAMES[m.group(2)]}"]
    raise CheckpointError(f"no Hugging Face name is known for native key {native_key!r}")


def expected_shapes(args: ModelArgs) -> dict[str, torch.Size]:
    """Native key -> shape of every tensor in a checkpoint, from a meta-device model."""
    with torch.device("meta"):
        model = Moonlight(args)
    return {k: v.shape for k, v in model.state_dict().items()}


def _check_keys(found: set[str], expected: set[str], what: str):
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing:
        raise CheckpointError(f"{what} is missing {len(missing)} key(s), e.g. {missing[:5]}")
    if unexpected:
        raise CheckpointError(
            f"{what} has {len(unexpected)} unexpected key(s), e.g. {unexpected[:5]} "
            "(a different architecture or config?)"
        )


def _read_weight_map(index: str) -> dict[str, str]:
    """The index's key -> shard file map; every shard a relative path inside the index's directory."""
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(
            f'{index} is not a safetensors index (a JSON object with a "weight_map"): {type(e).__name__}: {e}'
        ) from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f'{index}: "weight_map" must map tensor names to shard file names')
    outside = sorted(
        {v for v in weight_map.values() if os.path.isabs(v) or os.path.normpath(v).split(os.sep)[0] in ("..", ".")}
    )
    if outside:
        raise CheckpointError(f"{index} names shard files outside its directory: {outside[:5]}; refusing to read them")
    return weight_map


# What save_hf writes into its directory: --overwrite replaces these and nothing else.
HF_OUTPUT = re.compile(r"^(config\.json|model\.safetensors\.index\.json|model(-\d{5}-of-\d{5})?\.safetensors)$")

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def open_safetensors(path: str):
    """A safetensors handle (`safe_open`); opening reads its header and checks it against the file size."""
    try:
        return safe_open(path, "pt")
    except Exception as e:  # SafetensorError (header, truncation) or OSError
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def _finite(tensor: torch.Tensor, key: str, where: str) -> torch.Tensor:
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(
            f"{where}: {key} holds {bad} NaN/Inf value(s) of {tensor.numel()}; a model trained "
            "or exported from it would be garbage: use an earlier, finite checkpoint"
        )
    return tensor


class HFCheckpoint:
    """Read access to a HF safetensors directory (single file or sharded with an index), tensor by
    tensor or slice by slice, never loading a whole shard."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        index = os.path.join(self.path, "model.safetensors.index.json")
        single = os.path.join(self.path, "model.safetensors")
        self._handles: dict[str, object] = {}
        if os.path.exists(index):
            self.key_to_file = _read_weight_map(index)
        elif os.path.exists(single):
            self.key_to_file = {k: "model.safetensors" for k in self._open("model.safetensors").keys()}
        else:
            bins = [n for n in os.listdir(self.path) if n.endswith((".bin", ".pt", ".pth"))]
            hint = " (pickle checkpoints are not loaded: convert them to safetensors)" if bins else ""
            raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {self.path}{hint}")
        missing_files = sorted({f for f in self.key_to_file.values() if not os.path.exists(os.path.join(self.path, f))})
        if missing_files:
            raise CheckpointError(f"the index of {self.path} names shard file(s) that do not exist: {missing_files}")
        for name in sorted(set(self.key_to_file.values())):  # headers only: catches truncated shards now
            self._open(name)
        self.args = ModelArgs.from_hf_config(self.path)
        # DeepSeek-V3 stores its num_nextn_predict_layers multi-token-prediction modules as the layers after
        # the last decoder layer; we do not run them. Any other extra layer stays an unexpected key.
        with open(os.path.join(self.path, "config.json"), encoding="utf-8") as f:  # read by from_hf_config already
            n_mtp = json.load(f).get("num_nextn_predict_layers") or 0
        n = self.args.num_hidden_layers
        mtp = sorted(k for k in self.key_to_file if (m := _HF_LAYER.match(k)) and n <= int(m.group(1)) < n + n_mtp)
        if mtp:
            warnings.warn(
                f"{self.path}: skipping {len(mtp)} multi-token-prediction tensor(s) of layer(s) "
                f"{n}..{n + n_mtp - 1} (e.g. {mtp[0]}): this model does not run them",
                stacklevel=2,
            )
            for k in mtp:
                del self.key_to_file[k]

    def _open(self, name: str):
        """A shard's safetensors handle; opening reads its header and checks it against the file size."""
        if name not in self._handles:
            self._handles[name] = open_safetensors(os.path.join(self.path, name))
        return self._handles[name]

    def _handle(self, key: str):
        if key not in self.key_to_file:
            raise CheckpointError(f"checkpoint {self.path} is missing key {key!r}")
        return self._open(self.key_to_file[key])

    def shape(self, key: str) -> list[int]:
        return self._handle(key).get_slice(key).get_shape()

    def check_shape(self, key: str, expected: torch.Size | tuple[int, ...]) -> None:
        found = self.shape(key)
        if tuple(found) != tuple(expected):
            raise CheckpointError(
                f"shape mismatch for {key!r}: expected {tuple(expected)}, found {tuple(found)} "
                "(is the config.json the one this checkpoint was saved with?)"
            )

    def dtype(self, key: str) -> torch.dtype:
        name = self._handle(key).get_slice(key).get_dtype()
        if name not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self.path}: {key} has dtype {name}, not a floating-point weight")
        return _SAFETENSORS_DTYPES[name]

    def check(self, args: ModelArgs) -> None:
        """What every loader checks before reading a value: no FP8 (its values mean nothing without
        their scales), the keys `args` expects and no others (no extra layers), floating dtypes."""
        names = {k: self._handle(k).get_slice(k).get_dtype() for k in self.key_to_file}
        fp8 = sorted(k for k, name in names.items() if name.startswith("F8") or k.endswith("weight_scale_inv"))
        if fp8:
            raise CheckpointError(
                f"{self.path} is an FP8-quantized checkpoint ({len(fp8)} FP8 or weight_scale_inv "
                f"tensors, e.g. {fp8[0]}): dequantize it to bfloat16 first (e.g. DeepSeek-V3's "
                "inference/fp8_cast_bf16.py); its weights mean nothing without their scales"
            )
        self.check_keys(args)
        for key in names:
            self.dtype(key)

    def get(self, key: str) -> torch.Tensor:
        return _finite(self._handle(key).get_tensor(key), key, self.path)

    def read(self, key: str, region: tuple[slice, ...]) -> torch.Tensor:
        """Only `region` of one tensor (checked finite), read lazily."""
        return _finite(self._handle(key).get_slice(key)[region], key, self.path)

    def native(self, native_key: str, args: ModelArgs) -> torch.Tensor:
        """One native tensor: an expert stack is stacked from its per-expert HF tensors."""
        tensors = [self.get(k) for k in hf_keys(native_key, args)]
        return torch.stack(tensors) if is_expert_stack(native_key) else tensors[0]

    def get_slice(self, key: str):
        """A lazy slice object: index it (e.g. `[a:b]`) to read only those rows."""
        return self._handle(key).get_slice(key)

    def check_keys(self, args: ModelArgs):
        found = {k for k in self.key_to_file if not _HF_PASSTHROUGH.match(k)}
        _check_keys(
            found, {hf for native in expected_shapes(args) for hf in hf_keys(native, args)}, f"checkpoint {self.path}"
        )


# transformers' in-memory MoE layout: one [E, 2I, H] tensor of gate and up rows, one [E, H, I] of down
_HF_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_HF_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")

StateDict = Mapping[str, torch.Tensor]
Pairs = Iterator[tuple[str, torch.Tensor]]


def to_hf_state_dict(
    state: StateDict | Pairs, args: ModelArgs, fused_experts: bool = True
) -> dict[str, torch.Tensor] | Pairs:
    """The native model's state dict in Hugging Face names, tensors unchanged (no copy, no cast).
    `fused_experts`: transformers' in-memory experts (`gate_up_proj`, `down_proj`: what
    `DeepseekV3ForCausalLM.load_state_dict` takes); False: one tensor per expert, as in the files.
    An iterator of (key, tensor) pairs in the native order is converted as a stream of pairs."""
    pairs = _to_hf_pairs(iter(state.items()) if isinstance(state, Mapping) else state, args, fused_experts)
    return dict(pairs) if isinstance(state, Mapping) else pairs


def _to_hf_pairs(native: Pairs, args: ModelArgs, fused: bool) -> Pairs:
    gate = {}  # layer -> its expert gate_proj stack, until up_proj arrives to be fused with it
    for key, tensor in native:
        m = _EXPERT_STACK.match(key)
        if not m:
            yield hf_keys(key, args)[0], tensor
        elif not fused:
            yield from zip(hf_keys(key, args), tensor.unbind(0))
        elif m.group(2) == "gate_proj":
            gate[m.group(1)] = tensor
        else:
            name = "gate_up_proj" if m.group(2) == "up_proj" else "down_proj"
            if name == "gate_up_proj" and m.group(1) not in gate:
                raise CheckpointError(f"{key} arrived before layers.{m.group(1)}.ffn.experts.gate_proj")
            value = torch.cat([gate.pop(m.group(1)), tensor], dim=1) if name == "gate_up_proj" else tensor
            yield f"model.layers.{m.group(1)}.mlp.experts.{name}", value
    if gate:
        raise CheckpointError(f"no experts.up_proj came for the gate_proj of layer(s) {sorted(gate)}")


def from_hf_state_dict(state: StateDict | Pairs, args: ModelArgs) -> dict[str, torch.Tensor] | Pairs:
    """A Hugging Face state dict (transformers' fused experts or one tensor per expert) in native names,
    for `Moonlight.load_state_dict`; tensors are not cast or copied (stacked experts are new tensors).
    An iterator of (key, tensor) pairs is converted as a stream: it holds one layer's experts at most."""
    native = expected_shapes(args)
    pairs = _from_hf_pairs(iter(state.items()) if isinstance(state, Mapping) else state, args, native)
    return dict(pairs) if isinstance(state, Mapping) else pairs


def _from_hf_pairs(hf: Pairs, args: ModelArgs, expected: dict[str, torch.Size]) -> Pairs:
    renames = {
        keys[0]: native for native in expected if not is_expert_stack(native) for keys in [hf_keys(native, args)]
    }
    experts: dict[str, dict[int, torch.Tensor]] = {}  # native expert stack -> the experts seen so far
    done = set()
    for key, tensor in hf:
        if _HF_PASSTHROUGH.match(key):
            continue
        fused, single = _HF_FUSED.match(key), _HF_EXPERT.match(key)
        if key in renames:
            out = [(renames[key], tensor)]
        elif fused and fused.group(2) == "gate_up_proj":
            gate, up = tensor.chunk(2, dim=1)
            out = [(f"layers.{fused.group(1)}.ffn.experts.{p}", t) for p, t in (("gate_proj", gate), ("up_proj", up))]
        elif fused:
            out = [(f"layers.{fused.group(1)}.ffn.experts.down_proj", tensor)]
        elif (
            single
            and f"layers.{single.group(1)}.ffn.experts.{single.group(3)}" in expected
            and int(single.group(2)) < args.n_routed_experts
        ):
            stack = f"layers.{single.group(1)}.ffn.experts.{single.group(3)}"
            experts.setdefault(stack, {})[int(single.group(2))] = tensor
            if len(experts[stack]) < args.n_routed_experts:
                continue
            by_expert = experts.pop(stack)
            out = [(stack, torch.stack([by_expert[e] for e in range(args.n_routed_experts)]))]
        else:
            raise CheckpointError(
                f"no native name is known for Hugging Face key {key!r} (a different architecture or config?)"
            )
        for native, value in out:
            if native not in expected or tuple(value.shape) != tuple(expected[native]):
                raise CheckpointError(
                    f"{key}: shape {tuple(tensor.shape)} does not match the config's "
                    f"{native} {tuple(expected.get(native, ()))}"
                )
            done.add(native)
            yield native, value
    _check_keys(done, set(expected), "the Hugging Face state dict")


def load_hf(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu", **arg_overrides
) -> Moonlight:
    """Build a Moonlight from a HF checkpoint directory, reading one tensor at a time straight into
    the model's storage. `dtype` defaults to float32; `arg_overrides` change ModelArgs fields that do
    not affect shapes (e.g. kernels="torch")."""
    ckpt = HFCheckpoint(path)
    args = ModelArgs.from_hf_config(ckpt.path, **arg_overrides)
    ckpt.check(args)
    with torch.device("meta"):
        model = Moonlight(args)
    model.to_empty(device=device)
    model.to(dtype or torch.float32)
    model.init_weights()  # buffers that are not in the checkpoint (load counters)
    state = model.state_dict()
    with torch.no_grad(), progress(len(state), f"loading {ckpt.path}") as bar:
        for native, tensor in state.items():
            keys = hf_keys(native, args)
            rows = tensor.unbind(0) if is_expert_stack(native) else [tensor]
            for key, dst in zip(keys, rows):
                ckpt.check_shape(key, dst.shape)
                dst.copy_(ckpt.get(key))
            bar.update()
    return model


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        size = str(size)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, re.IGNORECASE)
    if not m:
        raise ConfigError(f"max_shard_size={size!r}: use bytes or a string like '5GB' / '500MB'")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    size_bytes = int(float(m.group(1)) * scale)
    if size_bytes < 1:  # 0 would write one file per tensor
        raise ConfigError(f"max_shard_size={size!r} must be positive: use a size like '5GB' / '500MB'")
    return size_bytes


def _plan_shards(items: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    shards, current, size = [], [], 0
    for key, nbytes in items:
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    return shards + ([current] if current else [])


def _hf_pieces(
    native_tensors: Iterable[tuple[str, torch.Tensor]], args: ModelArgs, dtype: torch.dtype | None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF key, tensor) pairs in HF order, each its own CPU copy (experts unstacked), so a stacked
    native tensor is freed as soon as the stream moves past it."""
    for native, tensor in native_tensors:
        for key, t in zip(hf_keys(native, args), tensor.unbind(0) if is_expert_stack(native) else [tensor]):
            out = torch.float32 if key.endswith("e_score_correction_bias") else (dtype or t.dtype)
            piece = t.detach().to("cpu", out, copy=True).contiguous()
            if not torch.isfinite(piece).all():
                cast = (
                    f" (finite before the cast to {out}, which overflows: export as bfloat16 or float32)"
                    if torch.isfinite(t).all()
                    else ""
                )
                raise CheckpointError(f"{key} holds NaN/Inf values{cast}; refusing to write it")
            yield key, piece


def save_hf(
    model: Moonlight,
    path: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> None:
    """Write `config.json`, sharded `model-0000i-of-0000n.safetensors` and their index, loadable by
    `transformers.AutoModelForCausalLM.from_pretrained`. Written into a temporary directory and
    renamed into place, so an interrupted save never leaves a directory that looks complete.
    `overwrite` replaces an earlier export; a directory holding any other file is refused."""
    sd = model.state_dict()
    save_hf_stream(
        iter(sd.items()),
        {k: (v.shape, v.dtype) for k, v in sd.items()},
        model.args,
        path,
        max_shard_size,
        dtype,
        overwrite,
    )


def save_hf_stream(
    native_tensors: Iterator[tuple[str, torch.Tensor]],
    specs: dict[str, tuple[torch.Size | tuple[int, ...], torch.dtype]],
    args: ModelArgs,
    path: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> None:
    """`save_hf` from a stream of native (key, tensor) pairs that arrive in the order of `specs`
    (native key -> shape, dtype: the shards are planned from it up front). Holds at most the shard
    being written plus the current native tensor, so the tensors can be read (or gathered) one at a
    time. The stream is consumed to its end even if writing fails (its producer may be collective)."""
    path = os.path.abspath(os.fspath(path))
    try:
        check_replaceable(path, HF_OUTPUT, overwrite, "a Hugging Face export")
        max_bytes = parse_size(max_shard_size)
        sizes = []
        for native, (shape, stored) in specs.items():
            keys = hf_keys(native, args)
            numel = math.prod(shape) // len(keys)
            sizes += [
                (key, numel * (4 if key.endswith("e_score_correction_bias") else (dtype or stored).itemsize))
                for key in keys
            ]
        shards = _plan_shards(sizes, max_bytes)
        _write_hf_dir(path, _hf_pieces(native_tensors, args, dtype), shards, sum(n for _, n in sizes), args, dtype)
    finally:
        for _ in native_tensors:  # drain: no-op on success
            pass


def _write_hf_dir(
    path: str,
    pieces: Iterator[tuple[str, torch.Tensor]],
    shards: list[list[str]],
    total: int,
    args: ModelArgs,
    dtype: torch.dtype | None,
) -> None:
    with staged_output(path, "the HF checkpoint") as tmp:
        names = (
            [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
            if len(shards) > 1
            else ["model.safetensors"]
        )
        shard_of = {key: names[i] for i, keys in enumerate(shards) for key in keys}
        with progress(len(shards), f"writing {path}", unit="shard") as bar:
            for name, keys in zip(names, shards):
                block = {}
                for expected in keys:
                    key, t = next(pieces)
                    if key != expected:
                        raise CheckpointError(f"internal: tensor {key} arrived where {expected} was planned")
                    block[key] = t
                save_file(block, os.path.join(tmp, name), metadata={"format": "pt"})
                del block, t
                bar.update()
        if len(names) > 1:
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": shard_of}, f, indent=2)
        hf_config = args.to_hf_config()
        if dtype is not None:
            hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        publish_mode(tmp)
        if os.path.exists(path):
            remove_own_dir(path, HF_OUTPUT)
        os.replace(tmp, path)

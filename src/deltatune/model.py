"""``PeftModel``: a thin front end over injection, checkpoint and the registered methods (the task
wrappers that subclass it are in ``tasks.py``; the module layout under it is in ``host.py``)."""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterable, Optional, Sequence, Union

from torch import nn

from . import checkpoint as ckpt
from . import host, hub, injection, merging, row_routing, status
from .adapter_tensors import activate
from .config import PeftConfig, TaskType
from .host import AdapterHost, uses_checkpointing
from .prompt_adapters import build_prompt_encoder
from .registry import PromptMethod, get_method, method_hook, task_model


def _check_adapter_name(name: str) -> None:
    # Names become folder names when saving (non-default adapters go into a sub-folder named after them):
    # a separator or a dot could write outside the save folder.
    if not isinstance(name, str) or not name or any(c in name for c in "./\\") or "\x00" in name:
        raise ValueError(f"adapter name must be a non-empty string without '.', '/' or '\\', got {name!r}")


class PeftModel(nn.Module):
    """A model with named adapters: add, switch, merge, save and load them.

    Args:
        model: The base model (a ``transformers`` model or any ``nn.Module``); adapted in place.
        peft_config: The first adapter's config.
        adapter_name: Its name.
        autocast_adapter_dtype: Keep adapters of float16/bfloat16 layers in float32.
    """

    #: Heads a task wrapper always trains in full (added to ``modules_to_save``).
    default_modules_to_save: tuple[str, ...] = ()
    #: transformers' ``Trainer`` refuses a quantized model unless it carries adapters: a peft ``PeftModel``,
    #: or a model with this flag of transformers' own adapter integration.
    _hf_peft_config_loaded = True

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False):
        super().__init__()
        self.base_model = AdapterHost(model, owner=self)
        self.peft_config: dict[str, PeftConfig] = {}
        self._active: list[str] = []
        self._prompt_off = False
        self._autocast_adapter_dtype = autocast_adapter_dtype
        self.add_adapter(adapter_name, peft_config, low_cpu_mem_usage)
        self.set_adapter(adapter_name)
        if uses_checkpointing(model):
            host.inputs_require_grad(self)

    def __setstate__(self, state) -> None:
        # (copies and unpickled models: the host's weak reference back to its PeftModel is not copied)
        super().__setstate__(state)
        self.base_model.set_owner(self)

    # ------------------------------------------------------------------ attribute fall-through
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args, adapter_names: Optional[Sequence[str]] = None, **kwargs):
        if adapter_names is not None:  # one adapter per row (see row_routing)
            return row_routing.call(self, self.forward, args, kwargs, adapter_names)
        prompt = self._active_prompt()
        if prompt is None:
            outputs = self.base_model.model(*args, **kwargs)
            for name in self._active:
                hook = getattr(get_method(self.peft_config[name].peft_type), "adjust_output", None)
                if hook is not None:
                    outputs = hook(self, outputs, self.peft_config[name], name)
            return outputs
        if args:  # the first positional argument of transformers models is input_ids
            kwargs["input_ids"] = args[0]
        config = self.peft_config[prompt]
        inputs = get_method(config.peft_type).model_inputs(self.prompt_encoder[prompt], self.base_model.model,
                                                           config.task_type == TaskType.CAUSAL_LM, **kwargs)
        return self.base_model.model(**inputs)

    def generate(self, *args, adapter_names: Optional[Sequence[str]] = None, **kwargs):
        """The base model's ``generate``; with ``adapter_names``, each prompt through its own adapter."""
        if adapter_names is not None:
            return row_routing.call(self, self.generate, args, kwargs, adapter_names)
        return self.base_model.model.generate(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        """The underlying model (adapter layers included)."""
        return self.base_model.model

    # ------------------------------------------------------------------ adapters
    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        """The active adapter's name (a list when several are active)."""
        return self._active[0] if len(self._active) == 1 else list(self._active)

    def _resolve_config(self, config: PeftConfig) -> PeftConfig:
        prepare = getattr(get_method(config.peft_type), "prepare_config", None)  # (e.g. a default target)
        config = config if prepare is None else prepare(self.base_model.model, config)
        extra = [m for m in self.default_modules_to_save if m not in (config.modules_to_save or [])]
        if extra:
            config = config.replace(modules_to_save=list(config.modules_to_save or []) + extra)
        return config

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: Optional[bool] = None) -> None:
        """Inject a new (inactive unless it is the first) adapter. On error the model is unchanged.

        ``low_cpu_mem_usage``: its tensors are created empty on the ``meta`` device, to be loaded
        (prompt-learning adapters are created as usual). ``autocast_adapter_dtype``: default, the model's.
        """
        _check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists; pick another name or delete it first")
        if not isinstance(peft_config, PeftConfig):
            raise TypeError(f"peft_config must be a PeftConfig (e.g. LoraConfig), got {type(peft_config).__name__}")
        if getattr(peft_config, "bias", "none") != "none" and any(
            getattr(c, "bias", "none") != "none" for c in self.peft_config.values()
        ):
            raise ValueError(
                f"adapter {adapter_name!r} trains biases (bias={peft_config.bias!r}) but another adapter "
                "already does; biases are shared base weights, so only one adapter may train them "
                "(set bias='none' for the others)"
            )
        method = get_method(peft_config.peft_type)
        config = self._resolve_config(peft_config)
        model = self.base_model.model
        prompt = isinstance(method, PromptMethod)
        if prompt != bool(self._prompt_names()) and self.peft_config:
            raise ValueError("prompt-learning adapters and adapters that wrap layers cannot share one model")
        if prompt:
            undo = injection.Undo(self)  # the encoder goes into this PeftModel, modules_to_save into the model
        else:
            autocast = self._autocast_adapter_dtype if autocast_adapter_dtype is None else autocast_adapter_dtype
            injected = injection.inject(model, config, adapter_name, method, autocast, low_cpu_mem_usage)
            undo = injected.undo
            if getattr(config, "fan_in_fan_out", None) is False and any(
                getattr(model.get_submodule(n), "fan_in_fan_out", False) for n in injected.names
            ):
                config = config.replace(fan_in_fan_out=True)  # recorded as peft records it for Conv1D
        try:
            if prompt:
                config = self._add_prompt(adapter_name, config, method)
            injection.add_modules_to_save(model, config.modules_to_save, adapter_name)
            self.peft_config[adapter_name] = config
            self._apply_active()
        except Exception:
            self.peft_config.pop(adapter_name, None)
            undo()
            raise

    # ------------------------------------------------------------------ prompt learning
    def _prompt_names(self) -> list[str]:
        return list(self._modules["prompt_encoder"]) if "prompt_encoder" in self._modules else []

    def _add_prompt(self, name: str, config: PeftConfig, method) -> PeftConfig:
        built = build_prompt_encoder(method, config, self.base_model.model)
        if "prompt_encoder" not in self._modules:
            self.prompt_encoder = nn.ModuleDict()
        self.prompt_encoder[name] = built.encoder
        return built.config

    def _active_prompt(self) -> Optional[str]:
        """The name of the active prompt-learning adapter (None if none is active, or adapters are disabled)."""
        names = self._prompt_names()
        if not names or self._prompt_off:
            return None
        return next((n for n in self._active if n in names), None)

    def set_adapter(self, adapter_name: Union[str, Sequence[str]]) -> None:
        """Activate one adapter, or several (their deltas are summed); they become trainable. Not safe beside a
        forward in another thread (that forward would mix adapters across layers): serialise the two."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; available: {list(self.peft_config)}")
        if len(names) > 1 and set(names) & set(self._prompt_names()):
            raise ValueError("only one prompt-learning adapter can be active at a time")
        self._unmerge_first("set_adapter")
        self._active = names
        self._apply_active()

    def _unmerge_first(self, caller: str) -> None:
        """Unmerge merged adapters (with a warning), as peft does before switching or disabling adapters:
        a merged delta would otherwise keep applying beside the adapters set now, or under disable_adapter."""
        if merging.has_merged(self.base_model.model):
            warnings.warn(f"{caller}: the model has merged adapters; unmerging them first (they stay unmerged)",
                          UserWarning, stacklevel=3)
            self.unmerge_adapter()

    def _apply_active(self) -> None:
        activate(self.base_model.model, self._active, self.peft_config)
        for name in self._prompt_names():
            for p in self.prompt_encoder[name].parameters():
                p.requires_grad_(name in self._active and not self.peft_config[name].inference_mode)

    def _switchable(self):
        model = self.base_model.model
        yield from injection.adapter_layers(model)
        yield from injection.saved_module_wrappers(model)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; available: {list(self.peft_config)}")
        injection.delete_adapter(self.base_model.model, adapter_name)
        if adapter_name in self._prompt_names():
            del self.prompt_encoder[adapter_name]
        del self.peft_config[adapter_name]
        remaining = [n for n in self._active if n != adapter_name]
        self._active = remaining or list(self.peft_config)[:1]
        self._apply_active()

    @contextlib.contextmanager
    def disable_adapter(self):
        """Context manager: inside it the model computes as the base model. Merged adapters are unmerged
        first (with a warning) and stay unmerged."""
        self._unmerge_first("disable_adapter")
        modules = [m for _, m in self._switchable()]
        for m in modules:
            m.set_disabled(True)
        self._prompt_off = True
        try:
            yield
        finally:
            self._prompt_off = False
            for m in modules:
                m.set_disabled(False)

    def update_and_allocate(self, global_step: int) -> None:
        """After each optimizer step, run the step of the first active adapter whose method has one
        (AdaLoRA: update importance scores and reallocate ranks)."""
        method_hook(self.peft_config, self._active, "update_and_allocate")(self, global_step)

    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                             combination_type: str = "svd", **options) -> None:
        """Add adapter ``adapter_name`` combining ``adapters`` with ``weights``, as their method does it (LoRA:
        every peft combination type, see :func:`deltatune.methods.lora.weighted.add_weighted_adapter`;
        ``options``: ``svd_rank``, ``svd_clamp``, ``svd_full_matrices``, ``svd_driver``, ``density``,
        ``majority_sign_method``, ``generator``)."""
        method_hook(self.peft_config, adapters, "add_weighted_adapter")(
            self, adapters, weights, adapter_name, combination_type, **options)

    # ------------------------------------------------------------------ merging
    def merge_adapter(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        """Add the adapters' deltas into the base weights (default: the active adapters).

        With ``safe_merge`` every new weight is checked for NaN/inf before it is written; if any layer
        fails, the layers already merged in this call are unmerged again. A base weight that other modules
        share (layer replication, tied embeddings) is first copied for the merging layer, so its delta
        stays in that layer (the copy remains after ``unmerge_adapter``).
        """
        names = list(self._active if adapter_names is None else adapter_names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; available: {list(self.peft_config)}")
        if set(names) & set(self._prompt_names()):
            raise ValueError("prompt-learning adapters add virtual tokens; they have no weights to merge")
        merging.merge_adapters(self.base_model.model, names, safe_merge)

    def unmerge_adapter(self) -> None:
        """Subtract every merged adapter again, restoring the base weights."""
        merging.unmerge_all(self.base_model.model)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[Sequence[str]] = None) -> nn.Module:
        """Merge adapters into the base weights and return the plain base model (no adapter layers);
        modules_to_save are replaced by the active adapter's trained copy."""
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        return injection.unwrap(self.base_model.model, keep_saved_copies=True)

    def unload(self) -> nn.Module:
        """Remove all adapter layers without merging and return the base model with its original weights."""
        self.unmerge_adapter()
        return injection.unwrap(self.base_model.model, keep_saved_copies=False)

    # ------------------------------------------------------------------ parameters
    get_layer_status = status.get_layer_status  # (each adapter layer's state, with peft's field names)
    get_model_status = status.get_model_status

    push_to_hub = hub.push_to_hub  # (save_pretrained into a temporary folder, then huggingface_hub's upload)
    get_nb_trainable_parameters = status.get_nb_trainable_parameters
    print_trainable_parameters = status.print_trainable_parameters

    gradient_checkpointing_enable = host.gradient_checkpointing_enable

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, save_directory: str, selected_adapters: Optional[Iterable[str]] = None,
                        safe_serialization: bool = True,
                        path_initial_model_for_weight_conversion: Optional[str] = None, **kwargs) -> None:
        """Write each adapter as ``adapter_config.json`` + ``adapter_model.safetensors``; adapters other
        than ``"default"`` go into a sub-folder named after them (as peft does).

        ``path_initial_model_for_weight_conversion``: the folder a PiSSA/OLoRA adapter was saved to right
        after initialisation; the adapter is then written as plain LoRA for the original base model.
        ``state_dict``: the values to write, from a full state dict (as peft takes it: FSDP users pass the
        gathered one on rank 0). A process killed mid-save leaves the previous folder or the new one.
        """
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is a file, not a folder")
        if not safe_serialization:
            raise ValueError("deltatune only writes safetensors (pickle files can run code when loaded)")
        names = list(self.peft_config if selected_adapters is None else selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; available: {list(self.peft_config)}")
        base_name = getattr(getattr(self.base_model.model, "config", None), "name_or_path", None) or None
        initial = path_initial_model_for_weight_conversion
        adapters = []  # (other adapters go into sub-folders named after them, as peft writes them)
        for name in names:
            config = self.peft_config[name]
            config = config.replace(inference_mode=True,
                                    base_model_name_or_path=config.base_model_name_or_path or base_name)
            adapters.append((name, config, initial if name == "default" or initial is None else os.path.join(initial, name)))
        # One atomic step for the whole folder; state_dict: a full state dict (e.g. gathered from FSDP shards)
        ckpt.save_adapters(self, save_directory, adapters, base_name, state_dict=kwargs.get("state_dict"))

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[PeftConfig] = None,
                        autocast_adapter_dtype: bool = True, subfolder: Optional[str] = None,
                        revision: Optional[str] = None, low_cpu_mem_usage: bool = False,
                        key_mapping: Optional[dict[str, str]] = None, ephemeral_gpu_offload: bool = False,
                        **hub_kwargs) -> "PeftModel":
        """Load a saved adapter (local folder or Hub id) onto ``model``.

        The files are read and checked before the model is touched; if the weights do not fit, the
        injected layers are removed again and the model is left as it was. ``low_cpu_mem_usage``: the
        adapter is created empty (no initialisation) and takes the file's tensors by assignment.
        ``key_mapping``: see :func:`deltatune.checkpoint.rename_keys`. ``ephemeral_gpu_offload`` is accepted
        for peft compatibility and changes nothing (DoRA's norms are computed where the weights are).
        ``torch_device``: where the file's tensors are read to; ``hub_kwargs`` (``token``, ``cache_dir``, ...)
        go to the Hub download.
        """
        files = ckpt.read_adapter(model_id, subfolder, revision, key_mapping, config, **hub.take_device_map(hub_kwargs))
        config, weights = files.config.for_load(is_trainable), files.weights
        target_cls = (task_model(config.task_type) or PeftModel) if cls is PeftModel else cls
        undo = injection.Undo(model)  # taken before the adapter goes in: a failed load puts all of it back
        try:
            peft_model = target_cls(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                    low_cpu_mem_usage=low_cpu_mem_usage)
            peft_model._load_weights(weights, adapter_name)
        except Exception:
            undo()
            raise
        if not is_trainable:  # as peft: dropout off by default for a loaded adapter
            peft_model.eval()
        return peft_model

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False,
                     subfolder: Optional[str] = None, revision: Optional[str] = None,
                     autocast_adapter_dtype: Optional[bool] = None, low_cpu_mem_usage: bool = False,
                     key_mapping: Optional[dict[str, str]] = None, ephemeral_gpu_offload: bool = False,
                     **hub_kwargs) -> ckpt.LoadResult:
        """Load another saved adapter next to the existing ones (it is not activated) and return the load
        result (``missing_keys``, ``unexpected_keys``); without ``is_trainable`` the model is put in eval
        mode, as peft does. The options are those of :meth:`from_pretrained`. A forward running meanwhile in
        another thread computes with the active adapters, unchanged (as it does beside ``delete_adapter`` of an
        inactive one); :meth:`set_adapter` is not safe so (``deltatune serve`` does all on one thread)."""
        _check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists; pick another name or delete it first")
        files = ckpt.read_adapter(model_id, subfolder, revision, key_mapping, **hub.take_device_map(hub_kwargs))
        config, weights = files.config.for_load(is_trainable), files.weights
        undo = injection.Undo(self)  # this PeftModel and its model as they are before the adapter goes in
        self.add_adapter(adapter_name, config, low_cpu_mem_usage, autocast_adapter_dtype)
        try:
            result = self._load_weights(weights, adapter_name)
        except Exception:
            del self.peft_config[adapter_name]
            undo()
            raise
        if not is_trainable:  # as peft: dropout off by default for a loaded adapter
            self.eval()
        return result

    def _load_weights(self, weights: dict, adapter_name: str) -> ckpt.LoadResult:
        bias = getattr(self.peft_config[adapter_name], "bias", "none")
        result = ckpt.load_into(self, ckpt.from_peft_keys(self, weights, adapter_name), adapter_name, bias)
        ckpt.warn_missing(result.missing_keys, adapter_name)
        return result

"""Saving and loading adapters in the HuggingFace PEFT format, split by job.

- :mod:`.keys`: the one place where deltatune's tensors get PEFT's key names (and back);
- :mod:`.load`: load planning, all-or-nothing ``load_into``;
- :mod:`.files`: adapter folders (atomic writes, safe reads) and the Hub download;
- :mod:`.sharded`: FSDP2 ``DTensor`` shards gathered for saving and cut for loading;
- :mod:`.convert`: PiSSA/OLoRA adapters saved as plain LoRA;
- :mod:`.errors`: :class:`CheckpointError`.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors``; tensor keys are the module path
(with the adapter name left out) plus a suffix per tensor, e.g.::

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight      (r, in)
    base_model.model.model.embed_tokens.lora_embedding_A               (r, num_embeddings)
    base_model.model.score.weight                                     (a modules_to_save copy)
    base_model.model.transformer.h.0.attn.c_attn.base_layer.bias       (bias="all"/"lora_only"/"oft_only"/...)
    base_model.vera_A                                                  (r, max_in): a method's shared tensor

Which tensors an adapter has (and which train) is :mod:`deltatune.adapter_tensors`' job, not this package's.
"""

from ..fileio import atomic_write_bytes
from ..injection import iter_modules
from .convert import convert_to_plain_lora
from .errors import CheckpointError
from .files import (
    HUB_KWARGS,
    PICKLE_NAME,
    SAFETENSORS_NAME,
    AdapterFiles,
    read_adapter,
    read_adapter_weights,
    resolve_adapter_dir,
    save_adapter,
    save_adapter_folder,
    save_adapters,
    write_model_card,
)
from .keys import (ROOT, adapted_module_names, adapter_tensors, from_peft_keys, rename_keys, saved_tensors,
                   state_dict_for_save, to_peft_keys, values_from_state_dict, without_wrappers)
from .load import LoadResult, load_into, warn_missing

__all__ = [
    "CheckpointError", "LoadResult", "adapted_module_names", "adapter_tensors", "state_dict_for_save", "load_into",
    "save_adapter_folder", "read_adapter_weights", "rename_keys", "resolve_adapter_dir", "atomic_write_bytes",
    "iter_modules", "HUB_KWARGS", "PICKLE_NAME", "ROOT", "SAFETENSORS_NAME", "convert_to_plain_lora",
    "from_peft_keys", "save_adapter", "to_peft_keys", "warn_missing", "write_model_card", "read_adapter", "AdapterFiles", "without_wrappers",
    "saved_tensors", "values_from_state_dict", "save_adapters",
]

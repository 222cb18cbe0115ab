"""``PeftModel.push_to_hub``: the adapter folder ``save_pretrained`` writes, uploaded with ``huggingface_hub``."""

from __future__ import annotations

import tempfile
from typing import Iterable, Optional


def push_to_hub(model, repo_id: str, commit_message: Optional[str] = None, private: Optional[bool] = None,
                token=None, create_pr: bool = False, revision: Optional[str] = None,
                commit_description: Optional[str] = None, selected_adapters: Optional[Iterable[str]] = None,
                **save_kwargs):
    """Save the adapters (as :meth:`PeftModel.save_pretrained` does, model card included) into a temporary
    folder and upload it to the Hub repository ``repo_id`` (created if missing), as peft's ``push_to_hub``
    does. Returns ``huggingface_hub``'s commit info. ``save_kwargs`` go to ``save_pretrained``."""
    from huggingface_hub import HfApi  # (a dependency of transformers; imported only when pushing)

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, selected_adapters=selected_adapters, **save_kwargs)
        api.create_repo(repo_id, token=token, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, token=token, create_pr=create_pr,
                                 revision=revision, commit_message=commit_message or "Upload adapter with deltatune",
                                 commit_description=commit_description)


def take_device_map(kwargs: dict) -> dict:
    """``kwargs`` of a load call with peft's ``device_map`` turned into ``torch_device``: a single device
    (``"cpu"``, ``"cuda:0"``, ``{"": "cuda:0"}``) is where the file's tensors are read to; ``"auto"`` and
    per-module maps change nothing, since every adapter tensor is made on its own layer's device (where the
    base model was dispatched). Returns a new dict; the caller's is not changed."""
    kwargs = dict(kwargs)
    device_map = kwargs.pop("device_map", None)
    if isinstance(device_map, dict) and set(device_map) == {""}:
        device_map = device_map[""]
    if isinstance(device_map, (str, int)) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
        kwargs.setdefault("torch_device", device_map)
    return kwargs

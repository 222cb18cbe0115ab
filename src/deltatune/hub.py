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

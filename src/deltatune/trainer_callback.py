"""``AdapterCheckpointCallback``: checkpoints of a stock transformers ``Trainer`` that are adapter folders.

A stock ``Trainer`` recognises only peft's own classes as adapter models. For any other model that is not
a ``PreTrainedModel`` (a deltatune ``PeftModel`` among them) its ``_save`` writes the whole
``model.state_dict()`` into ``model.safetensors`` at every checkpoint, frozen base weights included, and
``resume_from_checkpoint`` / ``load_best_model_at_end`` read that file back with a non-strict
``load_state_dict``. No ``TrainingArguments`` option changes this, and a callback's ``on_save`` runs only
after the file is written.

This callback works inside those rules, without subclassing or patching the Trainer:

1. In the event right before a checkpoint is written (``on_step_end`` / ``on_epoch_end`` with
   ``control.should_save`` set, or ``on_evaluate`` under ``save_strategy="best"``) it registers a
   state-dict post-hook on the model, which drops every tensor that is not adapter state (the adapters'
   tensors, their modules_to_save copies and any other trainable parameter). The Trainer then writes a
   ``model.safetensors`` holding only those, under the model's own ``state_dict()`` names: no full copy is
   ever written, and the Trainer's own non-strict load at resume and at ``load_best_model_at_end``
   restores exactly the adapter state. The hook acts on one ``state_dict()`` call only and is removed in
   ``on_save`` (or at the next step, epoch or the end of training if no save followed), so
   ``model.state_dict()`` is complete at every other time.
2. In ``on_save`` it writes the adapters next to it in peft's format (``adapter_config.json`` +
   ``adapter_model.safetensors``, other adapters in sub-folders), loadable with
   ``PeftModel.from_pretrained`` in deltatune and in peft. Should a full ``model.safetensors`` have been
   written anyway (another callback asked for the save after this one ran), it is rewritten with the
   adapter state only.

Optimizer, scheduler, RNG and trainer state are the Trainer's own files, untouched.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from torch import Tensor, nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy

from .adapter_tensors import named_tensors
from .fileio import atomic_write
from .model import PeftModel

logger = logging.getLogger(__name__)

#: The file the Trainer writes a non-``PreTrainedModel``'s state dict to (transformers' SAFE_WEIGHTS_NAME).
WEIGHTS_NAME = "model.safetensors"


def checkpoint_tensor_names(model: nn.Module) -> set[str]:
    """The ``model.state_dict()`` keys a training checkpoint of ``model`` must hold.

    Those are every adapter's tensors (per its ``bias`` setting; modules_to_save copies with their buffers,
    prompt encoders) and every parameter that requires grad. The latter covers anything a user unfroze
    by hand, so that resuming restores all that the optimizer changes.

    Args:
        model: A deltatune ``PeftModel``.

    Returns:
        The keys, as ``model.state_dict()`` names them (no prefix).
    """
    keep: set[int] = set()
    for name, config in model.peft_config.items():
        keep.update(id(t) for t in named_tensors(model, name, getattr(config, "bias", "none")).values())
    # remove_duplicate=False: a tied tensor is listed under every name it has in the state dict.
    params = list(model.named_parameters(remove_duplicate=False))
    keep.update(id(p) for _, p in params if p.requires_grad)
    named = params + list(model.named_buffers(remove_duplicate=False))
    return {n for n, t in named if id(t) in keep}


class _AdapterStateOnly:
    """A one-shot state-dict post-hook: the first ``state_dict()`` after arming (the Trainer's, in ``_save``)
    loses every tensor that is not adapter state; later calls pass through untouched.

    One-shot so that, should training stop with an exception between arming and the save (the callback is
    not told), at most one later ``state_dict()`` call is affected rather than all of them.
    """

    def __init__(self) -> None:
        self.spent = False

    def __call__(self, module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
        if self.spent:
            return
        self.spent = True
        # The hook edits the dict in place. Under a wrapper (DDP's ``module.``) the dict also holds the
        # wrapper's own keys; only this module's keys (those under ``prefix``) are filtered.
        keep = checkpoint_tensor_names(module)
        for key in [k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in keep]:
            del state_dict[key]


def _ours(model: Optional[nn.Module]) -> bool:
    return isinstance(model, PeftModel)


class AdapterCheckpointCallback(TrainerCallback):
    """Make a stock ``transformers.Trainer`` checkpoint a deltatune model as adapter folders.

    Pass it to the Trainer: ``Trainer(model=peft_model, ..., callbacks=[AdapterCheckpointCallback()])``.
    Each ``checkpoint-N`` folder then holds ``adapter_config.json`` + ``adapter_model.safetensors`` (peft's
    format, loadable with ``PeftModel.from_pretrained`` in deltatune or peft), a ``model.safetensors`` with
    only the adapter state (for the Trainer's own ``resume_from_checkpoint`` and
    ``load_best_model_at_end``), and the Trainer's optimizer, scheduler, RNG and state files.

    On a model that is not a deltatune ``PeftModel`` it does nothing (the Trainer handles peft's models
    and ``PreTrainedModel`` itself). ``trainer.save_model()`` after training is not a checkpoint and still
    writes the full weights; save the adapter with ``model.save_pretrained(folder)`` instead.

    Example:
        >>> trainer = Trainer(model=model, args=TrainingArguments("out"), train_dataset=data,
        ...                   callbacks=[AdapterCheckpointCallback()])
        >>> trainer.train()                                  # out/checkpoint-500/adapter_model.safetensors ...
        >>> trainer.train(resume_from_checkpoint=True)      # adapters, optimizer, scheduler restored
    """

    def __init__(self) -> None:
        self._hook = None  # the state-dict hook's handle while a checkpoint is about to be written
        self._training = False  # between on_train_begin and on_train_end

    # ------------------------------------------------------------------ the hook's window
    def _arm(self, model: Optional[nn.Module]) -> None:
        if self._hook is None and _ours(model):
            self._hook = model.register_state_dict_post_hook(_AdapterStateOnly())

    def _disarm(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        """Arm the hook when the Trainer is about to checkpoint after this step."""
        if control.should_save:
            self._arm(model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        """Arm the hook when the Trainer is about to checkpoint after this epoch."""
        if control.should_save:
            self._arm(model)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        """Under ``save_strategy="best"`` the Trainer decides to save only after this event: arm in case
        (only during training: a ``trainer.evaluate()`` afterwards is followed by no save)."""
        if self._training and (control.should_save or args.save_strategy == SaveStrategy.BEST):
            self._arm(model)

    def on_train_begin(self, args, state, control, **kwargs):
        """Start of training (a hook left armed by a run that raised is removed first)."""
        self._disarm()
        self._training = True

    def on_step_begin(self, args, state, control, **kwargs):
        """Remove the hook if no save followed its arming (e.g. the evaluation was not a new best)."""
        self._disarm()

    def on_epoch_begin(self, args, state, control, **kwargs):
        """As :meth:`on_step_begin`."""
        self._disarm()

    def on_train_end(self, args, state, control, **kwargs):
        """As :meth:`on_step_begin`: the model leaves training with its hooks as it came."""
        self._disarm()
        self._training = False

    # ------------------------------------------------------------------ the checkpoint folder
    def on_save(self, args, state, control, model=None, **kwargs):
        """Write the adapters into the checkpoint the Trainer just wrote; keep its weights file slim."""
        self._disarm()
        if not _ours(model) or not args.should_save:  # (in DDP only the saving process writes files)
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            # Hyperparameter search saves under run-<trial>/, a folder this callback is not told about.
            logger.warning("AdapterCheckpointCallback: no checkpoint folder at %s; its adapter files were not "
                           "written", folder)
            return
        _slim_weights_file(model, os.path.join(folder, WEIGHTS_NAME))
        model.save_pretrained(folder)


def _slim_weights_file(model: nn.Module, path: str) -> None:
    """Rewrite the Trainer's ``model.safetensors`` at ``path`` with the adapter state only, if it holds more.

    Only reached when the hook was bypassed. The model is read, not the file: the Trainer wrote it from
    the same, unchanged model a moment ago.
    """
    if not os.path.isfile(path):  # (DeepSpeed and FSDP write their own formats; nothing to slim)
        return
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, framework="pt") as fh:
        written = set(fh.keys())
    keep = checkpoint_tensor_names(model)
    if written <= keep:
        return
    state = model.state_dict()
    # Copies: safetensors refuses tensors that share storage, and CPU tensors are what the file holds.
    tensors: dict[str, Tensor] = {k: v.detach().to("cpu", copy=True).contiguous()
                                  for k, v in state.items() if k in keep}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    logger.info("AdapterCheckpointCallback: %s held %d tensors; rewritten with the %d of the adapter state",
                path, len(written), len(tensors))


__all__ = ["AdapterCheckpointCallback", "checkpoint_tensor_names"]

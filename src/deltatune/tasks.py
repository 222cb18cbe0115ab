"""The task wrappers: what a PeftModel adds for causal LMs (``generate``), classification heads, etc.

Each wrapper registers itself for its ``TaskType`` (``registry.register_task_model``), which is how
``get_peft_model`` and ``PeftModel.from_pretrained`` pick one without importing this module.
"""

from __future__ import annotations

import inspect
from typing import Optional

from . import row_routing
from .config import TaskType
from .model import PeftModel
from .registry import get_method, register_task_model, task_model


_COMMON = ("attention_mask", "inputs_embeds")
_OUTPUTS = ("output_attentions", "output_hidden_states", "return_dict", "task_ids")


def _forward_with(names: tuple[str, ...]):
    """A ``forward`` whose signature names its task's arguments (``input_ids`` first, then ``names``), as
    transformers models' forwards do: transformers' ``Trainer`` keeps the dataset columns the model's
    forward names (a ``*args, **kwargs`` forward would make it drop them all).

    The call itself goes on to :meth:`PeftModel.forward` as it came: positional arguments unchanged (so
    ``model(ids, mask, position_ids)`` means what it means to the base model, and ``model(x)`` works for
    any module), keyword arguments too, less the named ones left at None (a base model without, say,
    ``inputs_embeds`` is never handed one).
    """
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    signature = inspect.Signature(
        [inspect.Parameter("self", kind)] + [inspect.Parameter(n, kind, default=None) for n in ("input_ids",) + names]
        + [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)])
    named = frozenset(("input_ids",) + names)

    def forward(self, *args, **kwargs):
        return PeftModel.forward(self, *args, **{k: v for k, v in kwargs.items() if v is not None or k not in named})

    forward.__signature__ = signature
    forward.__doc__ = ("The base model's forward with the active adapters; its signature names the task's arguments "
                       f"as transformers does: {', '.join(('input_ids',) + names)}.")
    return forward


class PeftModelForCausalLM(PeftModel):
    """Causal language models; ``generate`` runs the base model's generation with adapters active
    (with a prompt-learning adapter, through its method's ``generate``)."""

    #: Encoder-decoder models put prefixes into the decoder and return only decoder tokens from generate.
    _encoder_decoder = False
    forward = _forward_with(_COMMON + ("labels",) + _OUTPUTS)

    def generate(self, *args, adapter_names: Optional[list] = None, **kwargs):
        """The base model's ``generate`` with the active adapters, or with ``adapter_names`` (one adapter name
        per prompt, ``"__base__"`` for none) each prompt through its own adapter (beams and returned
        sequences follow their prompt)."""
        if adapter_names is not None:
            return row_routing.call(self, self.generate, args, kwargs, adapter_names)
        prompt = self._active_prompt()
        if prompt is None:
            return self.base_model.model.generate(*args, **kwargs)
        input_ids = args[0] if args else kwargs.pop("input_ids", None)
        method = get_method(self.peft_config[prompt].peft_type)
        return method.generate(self.prompt_encoder[prompt], self.base_model.model, input_ids,
                               encoder_decoder=self._encoder_decoder, **kwargs)


class PeftModelForSeq2SeqLM(PeftModelForCausalLM):
    """Encoder-decoder language models (T5, BART, ...); prompts go in front of the encoder input, prefixes
    into the decoder's self-attention, and ``generate`` returns decoder tokens, as without adapters."""

    _encoder_decoder = True
    forward = _forward_with(_COMMON + ("decoder_input_ids", "decoder_attention_mask", "decoder_inputs_embeds", "labels")
                            + _OUTPUTS)


class PeftModelForSequenceClassification(PeftModel):
    """Sequence classification; the new head (``classifier``/``score``) is trained in full."""

    default_modules_to_save = ("classifier", "score")
    forward = _forward_with(_COMMON + ("labels",) + _OUTPUTS)


class PeftModelForTokenClassification(PeftModel):
    default_modules_to_save = ("classifier", "score")
    forward = _forward_with(_COMMON + ("labels",) + _OUTPUTS)


class PeftModelForQuestionAnswering(PeftModel):
    default_modules_to_save = ("qa_outputs",)
    forward = _forward_with(_COMMON + ("token_type_ids", "position_ids", "start_positions", "end_positions") + _OUTPUTS)


class PeftModelForFeatureExtraction(PeftModel):
    """Encoders used for embeddings / as backbones."""

    forward = _forward_with(_COMMON + _OUTPUTS)


register_task_model(TaskType.CAUSAL_LM, PeftModelForCausalLM)
register_task_model(TaskType.SEQ_2_SEQ_LM, PeftModelForSeq2SeqLM)
register_task_model(TaskType.SEQ_CLS, PeftModelForSequenceClassification)
register_task_model(TaskType.TOKEN_CLS, PeftModelForTokenClassification)
register_task_model(TaskType.QUESTION_ANS, PeftModelForQuestionAnswering)
register_task_model(TaskType.FEATURE_EXTRACTION, PeftModelForFeatureExtraction)


def task_model_class(task_type: Optional[TaskType]) -> type:
    """The PeftModel class for ``task_type`` (None: :class:`PeftModel` itself)."""
    return task_model(task_type) or PeftModel

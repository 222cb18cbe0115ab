"""The task wrappers: what a PeftModel adds for causal LMs (``generate``), classification heads, etc.

Each wrapper registers itself for its ``TaskType`` (``registry.register_task_model``), which is how
``get_peft_model`` and ``PeftModel.from_pretrained`` pick one without importing this module.
"""

from __future__ import annotations

from typing import Optional

from .config import TaskType
from .model import PeftModel
from .registry import get_method, register_task_model, task_model


class PeftModelForCausalLM(PeftModel):
    """Causal language models; ``generate`` runs the base model's generation with adapters active
    (with a prompt-learning adapter, through its method's ``generate``)."""

    #: Encoder-decoder models put prefixes into the decoder and return only decoder tokens from generate.
    _encoder_decoder = False

    def generate(self, *args, **kwargs):
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


class PeftModelForSequenceClassification(PeftModel):
    """Sequence classification; the new head (``classifier``/``score``) is trained in full."""

    default_modules_to_save = ("classifier", "score")


class PeftModelForTokenClassification(PeftModel):
    default_modules_to_save = ("classifier", "score")


class PeftModelForQuestionAnswering(PeftModel):
    default_modules_to_save = ("qa_outputs",)


class PeftModelForFeatureExtraction(PeftModel):
    """Encoders used for embeddings / as backbones."""


register_task_model(TaskType.CAUSAL_LM, PeftModelForCausalLM)
register_task_model(TaskType.SEQ_2_SEQ_LM, PeftModelForSeq2SeqLM)
register_task_model(TaskType.SEQ_CLS, PeftModelForSequenceClassification)
register_task_model(TaskType.TOKEN_CLS, PeftModelForTokenClassification)
register_task_model(TaskType.QUESTION_ANS, PeftModelForQuestionAnswering)
register_task_model(TaskType.FEATURE_EXTRACTION, PeftModelForFeatureExtraction)


def task_model_class(task_type: Optional[TaskType]) -> type:
    """The PeftModel class for ``task_type`` (None: :class:`PeftModel` itself)."""
    return task_model(task_type) or PeftModel

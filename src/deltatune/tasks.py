"""The task wrappers: what a PeftModel adds for causal LMs (``generate``), classification heads, etc."""

from __future__ import annotations

from typing import Optional

import torch

from .config import TaskType
from .methods.prefix_tuning.encoder import with_prefix
from .methods.prompt_tuning.encoder import with_prompts
from .model import PeftModel


class PeftModelForCausalLM(PeftModel):
    """Causal language models; ``generate`` runs the base model's generation with adapters active."""

    #: Generation from prompt embeddings returns only new tokens; a causal LM's result starts with its input.
    _echo_input_ids = True

    def generate(self, *args, **kwargs):
        encoder = self._active_prompt()
        if encoder is None:
            return self.base_model.model.generate(*args, **kwargs)
        input_ids = args[0] if args else kwargs.pop("input_ids", None)
        if getattr(encoder, "is_prefix", False):
            return self._generate_with_prefix(encoder, input_ids, kwargs)
        inputs = with_prompts(encoder, self.base_model.model.get_input_embeddings(), input_ids,
                              kwargs.pop("inputs_embeds", None), kwargs.pop("attention_mask", None))
        new_tokens = self.base_model.model.generate(**inputs, **kwargs)  # from embeddings: new tokens only
        if input_ids is None or not self._echo_input_ids:
            return new_tokens
        return torch.cat([input_ids, new_tokens], dim=1)

    def _generate_with_prefix(self, encoder, input_ids, kwargs):
        """generate() sees the prefix cache as already-processed tokens: give it n placeholder ids in front
        (never embedded: the cache covers them) and remove them from the result."""
        model = self.base_model.model
        n = encoder.config.num_virtual_tokens
        pad = input_ids.new_zeros(input_ids.shape[0], n)
        inputs = with_prefix(encoder, model, input_ids, None, kwargs.pop("attention_mask", None))
        inputs["input_ids"] = torch.cat([pad, input_ids], dim=1)
        return model.generate(**inputs, **kwargs)[:, n:]


class PeftModelForSeq2SeqLM(PeftModelForCausalLM):
    """Encoder-decoder language models (T5, BART, ...); prompts go in front of the encoder input, prefixes
    into the decoder's self-attention, and ``generate`` returns decoder tokens, as without adapters."""

    _echo_input_ids = False

    def _generate_with_prefix(self, encoder, input_ids, kwargs):
        """The prefix cache is in the decoder: n placeholder decoder ids go before the start token (never
        embedded: the cache covers them) and are removed from the result."""
        model = self.base_model.model
        n = encoder.config.num_virtual_tokens
        start = kwargs.pop("decoder_input_ids", None)
        if start is None:
            token = getattr(model.generation_config, "decoder_start_token_id", None)
            token = model.config.decoder_start_token_id if token is None else token
            start = input_ids.new_full((input_ids.shape[0], 1), token)
        # A decoder mask as long as the decoder ids is how generate() knows to feed only the ids after the cache.
        mask = kwargs.pop("decoder_attention_mask", None)
        mask = torch.ones_like(start) if mask is None else mask
        inputs = with_prefix(encoder, model, input_ids, None, kwargs.pop("attention_mask", None), mask)
        inputs["decoder_input_ids"] = torch.cat([start.new_zeros(start.shape[0], n), start], dim=1)
        return model.generate(**inputs, **kwargs)[:, n:]


class PeftModelForSequenceClassification(PeftModel):
    """Sequence classification; the new head (``classifier``/``score``) is trained in full."""

    default_modules_to_save = ("classifier", "score")


class PeftModelForTokenClassification(PeftModel):
    default_modules_to_save = ("classifier", "score")


class PeftModelForQuestionAnswering(PeftModel):
    default_modules_to_save = ("qa_outputs",)


class PeftModelForFeatureExtraction(PeftModel):
    """Encoders used for embeddings / as backbones."""


_TASK_MODELS = {
    TaskType.CAUSAL_LM: PeftModelForCausalLM,
    TaskType.SEQ_2_SEQ_LM: PeftModelForSeq2SeqLM,
    TaskType.SEQ_CLS: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION: PeftModelForFeatureExtraction,
}


def task_model_class(task_type: Optional[TaskType]) -> type:
    return PeftModel if task_type is None else _TASK_MODELS[TaskType(task_type)]

"""``AutoPeftModel`` and its task variants: load an adapter folder together with the base model it names.

``AutoPeftModelForCausalLM.from_pretrained("my-adapter")`` reads ``base_model_name_or_path`` (and
``revision``) from the adapter's config, loads that model with the matching transformers ``Auto`` class,
then the adapter onto it, as ``PeftModel.from_pretrained`` does.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from . import checkpoint as ckpt
from .config import PeftConfig, TaskType
from .model import PeftModel
from .registry import task_model

#: transformers' Auto class for each task (a config without a task type: ``AutoModel``).
_AUTO_CLASSES = {
    TaskType.CAUSAL_LM: "AutoModelForCausalLM",
    TaskType.SEQ_2_SEQ_LM: "AutoModelForSeq2SeqLM",
    TaskType.SEQ_CLS: "AutoModelForSequenceClassification",
    TaskType.TOKEN_CLS: "AutoModelForTokenClassification",
    TaskType.QUESTION_ANS: "AutoModelForQuestionAnswering",
    TaskType.FEATURE_EXTRACTION: "AutoModel",
}


class AutoPeftModel:
    """Loads the base model named by an adapter folder's config, then the adapter (its task type picks the
    transformers ``Auto`` class and the PeftModel wrapper). Subclasses fix the task."""

    #: The task this class loads for (None: whatever the adapter's config says).
    task_type: Optional[TaskType] = None

    def __init__(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is not built directly: use {type(self).__name__}.from_pretrained(...)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[PeftConfig] = None,
                        revision: Optional[str] = None, **kwargs) -> PeftModel:
        """Args:
            pretrained_model_name_or_path: The adapter folder (or Hub id).
            adapter_name, is_trainable, config: As for ``PeftModel.from_pretrained``.
            revision: The adapter's revision on the Hub (the base model's comes from its config).
            kwargs: Passed to the transformers ``from_pretrained`` of the base model (``torch_dtype``,
                ``quantization_config``, ``device_map``, ...).
        """
        import transformers

        folder = ckpt.resolve_adapter_dir(pretrained_model_name_or_path, revision=revision)
        adapter_config = config or PeftConfig.from_pretrained(folder)
        base_name = adapter_config.base_model_name_or_path
        if not base_name:
            raise ValueError(f"the adapter config in {folder} names no base model (base_model_name_or_path); load "
                             "the base model yourself and use PeftModel.from_pretrained(base, folder)")
        task = cls.task_type or adapter_config.task_type
        if cls.task_type is not None and adapter_config.task_type not in (None, cls.task_type):
            raise ValueError(f"{cls.__name__} loads {cls.task_type.value} adapters; this one is "
                             f"{TaskType(adapter_config.task_type).value}: use AutoPeftModel")
        auto_class = getattr(transformers, _AUTO_CLASSES.get(task, "AutoModel"))
        base: nn.Module = auto_class.from_pretrained(base_name, revision=adapter_config.revision, **kwargs)
        wrapper = task_model(task) or PeftModel
        return wrapper.from_pretrained(base, folder, adapter_name=adapter_name, is_trainable=is_trainable,
                                       config=config)


def _for(task: TaskType, doc: str) -> type:
    return type(f"AutoPeftModelFor{doc}", (AutoPeftModel,), {"task_type": task, "__doc__": f"{doc} adapters."})


AutoPeftModelForCausalLM = _for(TaskType.CAUSAL_LM, "CausalLM")
AutoPeftModelForSeq2SeqLM = _for(TaskType.SEQ_2_SEQ_LM, "Seq2SeqLM")
AutoPeftModelForSequenceClassification = _for(TaskType.SEQ_CLS, "SequenceClassification")
AutoPeftModelForTokenClassification = _for(TaskType.TOKEN_CLS, "TokenClassification")
AutoPeftModelForQuestionAnswering = _for(TaskType.QUESTION_ANS, "QuestionAnswering")
AutoPeftModelForFeatureExtraction = _for(TaskType.FEATURE_EXTRACTION, "FeatureExtraction")

__all__ = ["AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForSeq2SeqLM",
           "AutoPeftModelForSequenceClassification", "AutoPeftModelForTokenClassification",
           "AutoPeftModelForQuestionAnswering", "AutoPeftModelForFeatureExtraction"]

"""deltatune: parameter-efficient fine-tuning for PyTorch, checkpoint-compatible with HuggingFace PEFT."""

from .auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from .checkpoint import CheckpointError
from .config import ConfigError, PeftConfig, PeftType, TaskType
from .methods.lora.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from .mapping import (
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from .methods.adalora import AdaLoraConfig
from .methods.ia3 import IA3Config
from .methods.loha import LoHaConfig
from .methods.lokr import LoKrConfig
from .methods.lora import DoRAConfig, LoraConfig
from .methods.oft import OFTConfig
from .methods.p_tuning import PromptEncoderConfig
from .methods.prefix_tuning import PrefixTuningConfig
from .methods.prompt_tuning import PromptTuningConfig
from .methods.trainable_tokens import TrainableTokensConfig
from .methods.vera import VeraConfig
from .model import PeftModel
from .tasks import (
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from .quant import prepare_model_for_kbit_training
from .status import get_layer_status, get_model_status
from .targeting import TargetError

__version__ = "0.1.0"


def __getattr__(name: str):
    # AdapterCheckpointCallback subclasses transformers' TrainerCallback, and importing that pulls in
    # transformers' trainer utilities (seconds): loaded on first use, not on every `import deltatune`.
    if name == "AdapterCheckpointCallback":
        from .trainer_callback import AdapterCheckpointCallback

        return AdapterCheckpointCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AdaLoraConfig",
    "AdapterCheckpointCallback",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "CheckpointError",
    "ConfigError",
    "DoRAConfig",
    "IA3Config",
    "LoHaConfig",
    "LoKrConfig",
    "LoraConfig",
    "OFTConfig",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "TargetError",
    "TaskType",
    "TrainableTokensConfig",
    "VeraConfig",
    "get_layer_status",
    "get_model_status",
    "get_peft_model",
    "get_peft_model_state_dict",
    "hotswap_adapter",
    "inject_adapter_in_model",
    "prepare_model_for_compiled_hotswap",
    "prepare_model_for_kbit_training",
    "set_peft_model_state_dict",
]

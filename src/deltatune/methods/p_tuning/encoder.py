"""P-tuning's prompt encoder: trainable embeddings passed through an MLP or a bidirectional LSTM + MLP."""

from __future__ import annotations

from torch import Tensor, nn


class PromptEncoder(nn.Module):
    """Virtual tokens ``head(E)`` for ``E: (n, dim)``; ``(n, dim)`` out.

    Once loaded from a checkpoint (which holds the head's output, as peft saves it) or created in
    inference mode, the prompts are the embedding itself: ``raw`` mode.
    """

    checkpoint_kind = "prompt"

    def __init__(self, config, word_embeddings: nn.Embedding):
        super().__init__()
        weight = word_embeddings.weight
        n, dim = config.total_virtual_tokens(), config.token_dim
        self.num_virtual_tokens = config.num_virtual_tokens
        hidden = config.encoder_hidden_size or dim
        kw = dict(device=weight.device, dtype=weight.dtype)
        self.embedding = nn.Embedding(n, dim, **kw)
        self.lstm_head = None
        if config.encoder_reparameterization_type == "LSTM":
            self.lstm_head = nn.LSTM(dim, hidden, num_layers=config.encoder_num_layers, dropout=config.encoder_dropout,
                                     bidirectional=True, batch_first=True, **kw)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden, **kw), nn.ReLU(),
                                          nn.Linear(2 * hidden, dim, **kw))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden, **kw), nn.ReLU(), nn.Linear(hidden, hidden, **kw),
                                          nn.ReLU(), nn.Linear(hidden, dim, **kw))
        self.raw = bool(config.inference_mode)

    def prompts(self) -> Tensor:
        if self.raw:
            return self.embedding.weight
        x = self.embedding.weight.unsqueeze(0)
        if self.lstm_head is not None:
            x = self.lstm_head(x)[0]
        return self.mlp_head(x)[0]

    def adapter_params(self) -> dict[str, Tensor]:
        """What is saved: the prompts themselves (the head's output while training)."""
        return {"prompt_embeddings": self.prompts() if not self.raw else self.embedding.weight}

    def prepare_load(self) -> None:
        """A checkpoint holds final prompts: load them into the embedding and use it directly."""
        self.raw = True

    def forward(self, batch_size: int) -> Tensor:
        return self.prompts().unsqueeze(0).expand(batch_size, -1, -1)

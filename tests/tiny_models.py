"""Tiny random models of each architecture, built in the test, dropout off so ORT and PyTorch agree exactly."""

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    BartConfig,
    BertConfig,
    DebertaV2Config,
    DistilBertConfig,
    GPT2Config,
    RobertaConfig,
    T5Config,
)


VOCAB = 96
SEQ = 12

CONFIGS = {
    "bert": lambda: BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=64,
    ),
    "roberta": lambda: RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=64,
    ),
    "distilbert": lambda: DistilBertConfig(
        vocab_size=VOCAB,
        dim=32,
        n_layers=2,
        n_heads=2,
        hidden_dim=64,
        dropout=0.0,
        attention_dropout=0.0,
        seq_classif_dropout=0.0,
        max_position_embeddings=64,
    ),
    "deberta-v2": lambda: DebertaV2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=64,
        pooler_dropout=0.0,
    ),
    "gpt2": lambda: GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    ),
    "bart": lambda: BartConfig(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=None,
    ),
    "t5": lambda: T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_ff=64,
        d_kv=16,
        num_layers=1,
        num_heads=2,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    ),
}

TASKS = {
    "bert": "classification",
    "roberta": "classification",
    "distilbert": "classification",
    "deberta-v2": "classification",
    "gpt2": "causal-lm",
    "bart": "seq2seq",
    "t5": "seq2seq",
}


def tiny_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    config = CONFIGS[name]()
    task = TASKS[name]
    if task == "classification":
        config.num_labels = 2
        return AutoModelForSequenceClassification.from_config(config)
    if task == "causal-lm":
        return AutoModelForCausalLM.from_config(config)
    return AutoModelForSeq2SeqLM.from_config(config)


def tiny_dataset(name: str, size: int = 32, seed: int = 0):
    """Random token batches with the inputs and labels the model's task takes (a list of feature dicts)."""
    generator = torch.Generator().manual_seed(seed)
    task = TASKS[name]
    rows = []
    for _ in range(size):
        input_ids = torch.randint(3, VOCAB, (SEQ,), generator=generator)
        row = {"input_ids": input_ids, "attention_mask": torch.ones(SEQ, dtype=torch.long)}
        if task == "classification":
            row["labels"] = torch.tensor(int(input_ids[0]) % 2)
        elif task == "causal-lm":
            row["labels"] = input_ids.clone()
        else:
            row["labels"] = torch.flip(input_ids[: SEQ // 2], dims=[0])
        rows.append(row)
    return rows

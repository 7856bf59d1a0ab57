"""More Hugging Face architectures for `coverage.py`, built from configs (no downloads) like
the rows of `coverage_models.py`: hidden size 8, one layer (two where a rule reads across
layers), float64 random weights of unit gain, a batch in which every token id and position
appears."""

from __future__ import annotations

from coverage_models import _LLAMA, Build, T, V, _hf
from gaugenet.discovery.rules._examples import DEBERTA_V3_ATTENTION

_DEC = _LLAMA  # a decoder block: the Llama rows' sizes
_ENC = dict(
    vocab_size=V,
    hidden_size=8,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=16,
    max_position_embeddings=T,
    type_vocab_size=1,
)
_S2S = dict(
    vocab_size=V,
    d_model=8,
    encoder_layers=1,
    decoder_layers=1,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=16,
    decoder_ffn_dim=16,
    max_position_embeddings=T,
    use_cache=False,
)
_GPT2 = dict(vocab_size=V, n_embd=8, n_layer=1, n_head=2, n_positions=T, use_cache=False)


def _row(name: str, cls: str, cfg: str, **kw) -> tuple[str, Build]:
    return name, _hf(cls, cfg, 40, None, **kw)


def _hf_row(cls: str, cfg: str, **kw) -> tuple[str, Build]:
    """An encoder-decoder model: the decoder reads the batch with its tokens reversed."""

    def inputs(ids):
        return {"input_ids": ids, "decoder_input_ids": ids.flip(1)}

    return cls, _hf(cls, cfg, 40, inputs, **kw)


def _parallel(name: str, cls: str, cfg: str, **kw) -> tuple[str, Build]:
    """A parallel block (attention and MLP both read the embedding's LayerNorm): its MLP
    sees one input row per token, so the vocabulary must outnumber what the MLP can fit
    (128 ids, each several times; with 24 its parameters were not all reached: a table,
    not a symmetry)."""
    return name, _hf(cls, cfg, 96, None, **{**kw, "vocab_size": 128})


MORE_ROWS: list[tuple[str, Build]] = [
    _row("OlmoModel", "OlmoModel", "OlmoConfig", **_DEC),
    _row("OlmoForCausalLM", "OlmoForCausalLM", "OlmoConfig", **_DEC),
    _row("GemmaModel", "GemmaModel", "GemmaConfig", **_DEC, head_dim=4),
    _row("Gemma2Model", "Gemma2Model", "Gemma2Config", **_DEC, head_dim=4),
    # normalized queries and keys: per head, one gain of 4 shared by the heads (Qwen3);
    # over both heads' 8 features (OLMo 2, which also moves its norms after the blocks)
    _row("Qwen3Model", "Qwen3Model", "Qwen3Config", **_DEC, head_dim=4),
    _row("Olmo2Model", "Olmo2Model", "Olmo2Config", **_DEC),
    # gains `1 + w`, normalized after the heads are moved forward
    _row("Gemma3TextModel", "Gemma3TextModel", "Gemma3TextConfig", **_DEC, head_dim=4),
    _row("Exaone4Model", "Exaone4Model", "Exaone4Config", **_DEC, head_dim=4),
    # `nn.LayerNorm` of the head size on queries and keys, half the head rotary, fused
    # projection, squared-ReLU MLP
    _row(
        "PersimmonModel",
        "PersimmonModel",
        "PersimmonConfig",
        vocab_size=V,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=T,
        use_cache=False,
    ),
    _row("ArceeModel", "ArceeModel", "ArceeConfig", **_DEC),  # squared-ReLU MLP
    # queries and keys the attention pattern does not trace: L2-normalized without a gain
    # (Llama 4, one routed expert beside the shared one), and multi-head latent attention
    # (DeepSeek-V3, its first layer dense)
    _row(
        "Llama4TextModel",
        "Llama4TextModel",
        "Llama4TextConfig",
        **_DEC,
        head_dim=4,
        num_local_experts=1,
        num_experts_per_tok=1,
        intermediate_size_mlp=16,
    ),
    _row(
        "DeepseekV3Model",
        "DeepseekV3Model",
        "DeepseekV3Config",
        **_DEC,
        kv_lora_rank=4,
        q_lora_rank=4,
        qk_rope_head_dim=2,
        qk_nope_head_dim=2,
        v_head_dim=4,
        n_routed_experts=2,
        num_experts_per_tok=1,
        moe_intermediate_size=8,
        first_k_dense_replace=1,
    ),
    # encoder-decoder models, the decoder reading the batch reversed
    _hf_row(
        "T5Model",
        "T5Config",
        vocab_size=V,
        d_model=8,
        d_kv=4,
        d_ff=16,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        use_cache=False,
    ),
    _hf_row("BartModel", "BartConfig", **_S2S),
    # pre-LN encoder and decoder, token lookups times `√d`, sinusoidal position tables
    _hf_row("PegasusModel", "PegasusConfig", **_S2S, scale_embedding=True),
    # an `nn.Identity` norm in its first layer, which `torch.export.unflatten` loses
    _row("ModernBertModel", "ModernBertModel", "ModernBertConfig", **_ENC, pad_token_id=0),
    # LayerNorms without bias written as primitive operations (in float32), parallel block
    _parallel("CohereModel", "CohereModel", "CohereConfig", **_DEC),
    _parallel("PhiForCausalLM", "PhiForCausalLM", "PhiConfig", **_DEC),
    _row("Phi3Model", "Phi3Model", "Phi3Config", **_DEC, pad_token_id=0),
    # half the head's 4 dimensions rotary (the default quarter, one dimension, makes
    # the rotary tables 2 wide and the attention heads 5: not StableLM's own layout)
    _row(
        "StableLmForCausalLM",
        "StableLmForCausalLM",
        "StableLmConfig",
        **_DEC,
        partial_rotary_factor=0.5,
    ),
    _row(
        "GPTBigCodeModel (MQA)",
        "GPTBigCodeModel",
        "GPTBigCodeConfig",
        **_GPT2,
        multi_query=True,
    ),
    _parallel(
        "GPTJModel",
        "GPTJModel",
        "GPTJConfig",
        vocab_size=V,
        n_embd=8,
        n_layer=1,
        n_head=2,
        rotary_dim=2,
        n_positions=T,
        use_cache=False,
    ),
    _parallel(
        "CodeGenModel",
        "CodeGenModel",
        "CodeGenConfig",
        vocab_size=V,
        n_embd=8,
        n_layer=1,
        n_head=2,
        rotary_dim=2,
        n_positions=T,
        n_ctx=T,
        use_cache=False,
    ),
    _parallel(
        "FalconModel",
        "FalconModel",
        "FalconConfig",
        vocab_size=V,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        use_cache=False,
    ),
    _row(
        "BloomModel (ALiBi)",
        "BloomModel",
        "BloomConfig",
        vocab_size=V,
        hidden_size=8,
        n_layer=1,
        n_head=2,
        use_cache=False,
    ),
    _row(
        "MptModel (ALiBi)",
        "MptModel",
        "MptConfig",
        vocab_size=V,
        d_model=8,
        n_layers=1,
        n_heads=2,
        expansion_ratio=2,
        max_seq_len=T,
        use_cache=False,
    ),
    _row(
        "GPT2LMHeadModel (untied)",
        "GPT2LMHeadModel",
        "GPT2Config",
        **_GPT2,
        tie_word_embeddings=False,
    ),
    _row("ElectraModel", "ElectraModel", "ElectraConfig", **_ENC, embedding_size=8),
    _row("AlbertModel", "AlbertModel", "AlbertConfig", **_ENC, embedding_size=4),
    # ALBERT as released: one layer applied at every depth (here twice), its weights shared
    _row(
        "AlbertModel (shared, 2 layers)",
        "AlbertModel",
        "AlbertConfig",
        **{**_ENC, "num_hidden_layers": 2},
        embedding_size=4,
    ),
    _row(
        "XLMRobertaModel",
        "XLMRobertaModel",
        "XLMRobertaConfig",
        **{**_ENC, "max_position_embeddings": T + 2},
    ),
    _row(
        "DebertaV2Model",
        "DebertaV2Model",
        "DebertaV2Config",
        **{**_ENC, "type_vocab_size": 0},
    ),
    # DeBERTa-v3's attention: relative terms `q · k_r` and `k · q_r` from the query and key
    # maps applied to a LayerNorm-ed table of relative positions (log buckets)
    _row(
        "DebertaV2Model (relative)",
        "DebertaV2Model",
        "DebertaV2Config",
        **{**_ENC, "type_vocab_size": 0},
        **DEBERTA_V3_ATTENTION,
    ),
    # LayerNorm1P (an nn.LayerNorm subclass whose gain is `1 + w`), squared ReLU, half of
    # each head rotary (the config's default)
    _row("NemotronModel", "NemotronModel", "NemotronConfig", **_DEC, head_dim=4),
    # causal mask by `where(mask, scores, fill)`, scores in float32, no score scaling
    _row(
        "GPTNeoModel",
        "GPTNeoModel",
        "GPTNeoConfig",
        vocab_size=V,
        hidden_size=8,
        num_layers=1,
        num_heads=2,
        attention_types=[[["global"], 1]],
        max_position_embeddings=T,
        use_cache=False,
    ),
    # BART's layout with pre-LN layers and a LayerNorm after each stack
    _hf_row("MBartModel", "MBartConfig", **_S2S),
    _hf_row("BlenderbotModel", "BlenderbotConfig", **_S2S),
]

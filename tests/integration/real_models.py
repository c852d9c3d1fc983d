"""Tiny configurations of model code people train (random init, no hub access), shared by the integration tests
and the coverage table: each entry builds ``(model, batch, loss_fn)``."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Case = tuple[nn.Module, Tensor, Callable[[nn.Module, Tensor], Tensor]]
VOCAB, T, B = 64, 12, 4


def _tokens() -> Tensor:
    return torch.randint(0, VOCAB, (B, T + 1), generator=torch.Generator().manual_seed(0))


def _lm_loss(model: nn.Module, tokens: Tensor) -> Tensor:
    out = model(tokens[:, :-1])
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def _images(channels: int = 3, size: int = 16) -> Tensor:
    return torch.randn(B, channels, size, size, generator=torch.Generator().manual_seed(0))


def _classify(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits, torch.arange(x.shape[0]) % logits.shape[-1])


def gpt2() -> Case:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=T, n_embd=16, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config), _tokens(), _lm_loss


def llama(tied: bool) -> Case:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=T,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config), _tokens(), _lm_loss


def gemma() -> Case:
    """Gemma: a scaled word embedding (a subclass of ``nn.Embedding`` overriding forward) tied to the head."""
    from transformers import GemmaConfig, GemmaForCausalLM

    config = GemmaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=T,
    )  # fmt: skip
    return GemmaForCausalLM(config), _tokens(), _lm_loss


def moe(kind: str, experts: str = "eager") -> Case:
    """A mixture-of-experts model (Mixtral, Qwen2-MoE: a shared expert besides, OLMoE): experts as 3-d parameters,
    a router of its own class, four experts, two per token. ``eager``: its experts run as a loop of
    ``F.linear(x, p[e])`` calls; transformers' default (``grouped_mm``): one grouped product of all experts."""
    import transformers

    config_class, model_class = {
        "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
        "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
        "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
    }[kind]
    config = getattr(transformers, config_class)(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        num_local_experts=4, num_experts=4, num_experts_per_tok=2, max_position_embeddings=T,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = getattr(transformers, model_class)(config)
    model.set_experts_implementation(experts)
    return model, _tokens(), _lm_loss


def _seq2seq_loss(model: nn.Module, tokens: Tensor) -> Tensor:
    return model(input_ids=tokens[:, :-1], labels=tokens[:, 1:].contiguous()).loss


def bart() -> Case:
    """BART: scaled word embeddings shared by encoder, decoder and head, learned positions computed inside the
    embedding's forward (the decoder's of shape ``(1, t)``, broadcast along the batch)."""
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=T + 2,
        scale_embedding=True,
    )  # fmt: skip
    return BartForConditionalGeneration(config), _tokens(), _seq2seq_loss


def vit() -> Case:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, num_labels=4,
    )  # fmt: skip
    return ViTForImageClassification(config), _images(), _classify


def resnet() -> Case:
    """transformers' ResNet (the torchvision architecture, BasicBlock layers; see the README for why not
    torchvision itself)."""
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=4)
    return ResNetForImageClassification(config), _images(), _classify


class Encoder(nn.Module):
    """``nn.TransformerEncoder`` over embedded tokens with a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, tokens: Tensor) -> Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        return self.head(self.encoder(self.emb(tokens), mask=mask, is_causal=True))


class NanoGPT(nn.Module):
    """nanoGPT's shape: token and position embeddings, blocks of causal SDPA attention and an MLP, LayerNorms, and
    ``self.wte.weight = self.lm_head.weight`` (or, ``functional``, the head as ``F.linear(x, self.wte.weight)``)."""

    def __init__(self, d: int = 16, heads: int = 2, layers: int = 2, functional: bool = False) -> None:
        super().__init__()
        self.heads, self.functional = heads, functional
        self.wte, self.wpe = nn.Embedding(VOCAB, d), nn.Embedding(T, d)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "ln1": nn.LayerNorm(d),
                    "attn": nn.Linear(d, 3 * d),
                    "proj": nn.Linear(d, d),
                    "ln2": nn.LayerNorm(d),
                    "fc": nn.Linear(d, 4 * d),
                    "out": nn.Linear(4 * d, d),
                }
            )
            for _ in range(layers)
        )
        self.ln_f = nn.LayerNorm(d)
        if not functional:
            self.lm_head = nn.Linear(d, VOCAB, bias=False)
            self.wte.weight = self.lm_head.weight

    def forward(self, tokens: Tensor) -> Tensor:
        b, t = tokens.shape
        x = self.wte(tokens) + self.wpe(torch.arange(t))
        for blk in self.blocks:
            q, k, v = blk["attn"](blk["ln1"](x)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1)
            x = x + blk["proj"](y)
            x = x + blk["out"](F.gelu(blk["fc"](blk["ln2"](x))))
        x = self.ln_f(x)
        return F.linear(x, self.wte.weight) if self.functional else self.lm_head(x)


def torchvision_resnet18() -> Case:
    """torchvision's own resnet18 (from ``.thirdparty``: see ``thirdparty.py``)."""
    from tests.integration.thirdparty import load

    return load("torchvision").models.resnet18(num_classes=4), _images(size=32), _classify


def torchvision_swin() -> Case:
    """torchvision's Swin Transformer, tiny: its attention calls ``F.linear`` on the ``qkv`` and ``proj`` layers'
    weights and biases in a function, never the modules (captured from the second statistics step)."""
    from tests.integration.thirdparty import load

    swin = load("torchvision").models.swin_transformer
    model = swin.SwinTransformer(
        patch_size=[2, 2], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[2, 2], num_classes=4
    )
    return model, _images(size=16), _classify


def timm_vit() -> Case:
    from tests.integration.thirdparty import load

    timm = load("timm")
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=4, embed_dim=32, depth=2,
        num_heads=2,
    )  # fmt: skip
    return model, _images(size=32), _classify


def litgpt(llama: bool) -> Case:
    """litgpt's GPT: Pythia-style (LayerNorm, parallel residual, partial rotary) or Llama-style (RMSNorm, SwiGLU
    ``LLaMAMLP``, grouped queries)."""
    from tests.integration.thirdparty import load

    lit = load("litgpt")
    shape = {"n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": T, "vocab_size": VOCAB, "padded_vocab_size": VOCAB}
    if llama:
        config = lit.Config(
            **shape, bias=False, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", intermediate_size=32,
            n_query_groups=1, rotary_percentage=1.0, parallel_residual=False,
        )  # fmt: skip
    else:
        config = lit.Config(**shape, bias=True, rotary_percentage=0.25, parallel_residual=True)
    return lit.GPT(config), _tokens(), _lm_loss


def encoder() -> Case:
    return Encoder(), _tokens(), _lm_loss


def nanogpt() -> Case:
    return NanoGPT(), _tokens(), _lm_loss


CASES: dict[str, Callable[[], Case]] = {
    "resnet (transformers)": resnet,
    "vit (transformers)": vit,
    "gpt2": gpt2,
    "llama": lambda: llama(False),
    "llama tied": lambda: llama(True),
    "gemma": gemma,
    "bart": bart,
    "mixtral (grouped_mm experts)": lambda: moe("mixtral", experts="grouped_mm"),
    "qwen2-moe (eager experts)": lambda: moe("qwen2_moe"),
    "nanogpt tied": nanogpt,
    "nanogpt F.linear head": lambda: (NanoGPT(functional=True), _tokens(), _lm_loss),
    "TransformerEncoder": encoder,
    "litgpt pythia": lambda: litgpt(False),
    "litgpt llama": lambda: litgpt(True),
    "resnet18 (torchvision)": torchvision_resnet18,
    "swin (torchvision)": torchvision_swin,
    "vit (timm)": timm_vit,
}
# SGD's learning rate per case (default 0.05): on one batch of four images, BatchNorm and a ViT make plain SGD itself
# jump about at 0.05 (resnet18: 1.38, 1.76, 2.81, 0.02), so a falling loss over four steps needs a smaller one there
LR = {"resnet18 (torchvision)": 0.02, "vit (timm)": 0.02, "swin (torchvision)": 0.02}


def coverage(
    model: nn.Module, batch: Tensor, loss_fn, method: str, steps: int = 3, lr: float = 0.05, **options: object
) -> tuple[float, list[float]]:
    """(share of trainable elements whose gradient the manager rewrote at the last step, losses) over ``steps``
    SGD steps on one batch; ``options`` go to the manager."""
    from lightning_soo import PreconditionerManager

    torch.manual_seed(0)
    manager = PreconditionerManager(model, method, warn=lambda m: None, **options)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses, share = [], 0.0
    for _ in range(steps):
        opt.zero_grad()
        manager.begin_step()
        loss = loss_fn(model, batch)
        loss.backward()
        before = {id(p): p.grad.clone() for p in model.parameters() if p.grad is not None}
        manager.step(opt)
        total = sum(p.numel() for p in model.parameters() if p.requires_grad)
        changed = sum(
            p.numel() for p in model.parameters() if id(p) in before and not torch.equal(before[id(p)], p.grad)
        )
        share = changed / total
        opt.step()
        losses.append(float(loss.detach()))
    return share, losses

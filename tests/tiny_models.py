"""Tiny random models of the real architectures, saved the way real checkpoints are.

Tests use these instead of the real Janus-Pro and Real-ESRGAN weights (gigabytes, minutes per request
on a CPU). Each builder writes files to disk so that the code under test loads them through the same
code path a real user's checkpoint takes:

* :func:`build_tiny_janus` writes a ``JanusForConditionalGeneration`` checkpoint plus a ``JanusProcessor``
  (byte-level BPE tokenizer trained offline, image processor, the chat template of transformers' Janus
  weight converter) into a directory that ``AutoProcessor.from_pretrained`` and
  ``JanusForConditionalGeneration.from_pretrained`` load offline.
* :func:`build_tiny_esrgan` writes a Real-ESRGAN ``RRDBNet`` state dict in the basicsr key layout,
  wrapped as ``{"params_ema": ...}`` in a ``.pth`` file (like ``RealESRGAN_x2plus.pth``), which
  ``spandrel.ModelLoader().load_from_file`` recognises as an ESRGAN upscaler of scale 2 or 4.
* :func:`build_not_an_upscaler` writes a ``.pth`` file that spandrel cannot recognise.

Everything is seeded, so two builds give identical weights, and the global torch RNG is left untouched.

Tiny Janus at a glance (see the constants below): Llama text model with hidden size 64, 2 layers,
4 heads; vocabulary = tokenizer size (a few hundred byte-level BPE tokens plus the special tokens
of the real checkpoint); vision input 64 px with 16 px patches, so 4 x 4 = 16 image tokens per
image; VQ decoder with 5 resolution levels, so generated images are 4 * 2**4 = 64 px; 128 image codes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from transformers import JanusForConditionalGeneration, JanusProcessor, PreTrainedTokenizerFast

__all__ = [
    "ASSISTANT_TOKEN",
    "BOI_TOKEN",
    "BOS_TOKEN",
    "EOI_TOKEN",
    "EOS_TOKEN",
    "IMAGE_SIZE",
    "IMAGE_TOKEN",
    "JANUS_CHAT_TEMPLATE",
    "NUM_IMAGE_TOKENS",
    "PAD_TOKEN",
    "SEED",
    "TEXT_HIDDEN_SIZE",
    "TinyRRDBNet",
    "USER_TOKEN",
    "build_not_an_upscaler",
    "build_tiny_esrgan",
    "build_tiny_janus",
    "build_tiny_tokenizer",
]

SEED = 1234

# Special tokens spelled as in deepseek-ai/Janus-Pro-*.
BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
IMAGE_TOKEN = "<image_placeholder>"
BOI_TOKEN = "<begin_of_image>"
EOI_TOKEN = "<end_of_image>"
USER_TOKEN = "<|User|>"
ASSISTANT_TOKEN = "<|Assistant|>"
SPECIAL_TOKENS = (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    IMAGE_TOKEN,
    BOI_TOKEN,
    EOI_TOKEN,
    USER_TOKEN,
    ASSISTANT_TOKEN,
)

TEXT_HIDDEN_SIZE = 64
IMAGE_SIZE = 64  # vision input side and generated image side
PATCH_SIZE = 16
NUM_PATCHES = IMAGE_SIZE // PATCH_SIZE  # 4
NUM_IMAGE_TOKENS = NUM_PATCHES**2  # 16
# 5 levels, so 4 latent px * 2**4 = 64 px (real: (1, 1, 2, 2, 4) and 24 * 16 = 384); one channel change
# instead of three keeps the VQ model at ~1 M parameters instead of 3.3 M.
VQ_CHANNEL_MULTIPLIER = (1, 1, 1, 1, 2)
VQ_BASE_CHANNELS = 32  # GroupNorm(num_groups=32) is hard-coded in the VQ model
VQ_NUM_EMBEDDINGS = 128
BPE_VOCAB_SIZE = 512  # target for the trainer, before the special tokens are added

# Chat template of transformers' src/transformers/models/janus/convert_janus_weights_to_hf.py (not
# shipped in the wheel). Gives '<|User|>: <image_placeholder>\nq\n\n<|Assistant|>:'.
JANUS_CHAT_TEMPLATE = (
    "{%set seps=['\n\n','<\uff5cend\u2581of\u2581sentence\uff5c>']%}"
    "{%set i=0%}"
    "{%for message in messages%}"
    "{%if message['role']|lower=='user'%}"
    "<|User|>: "
    "{%elif message['role']|lower=='assistant'%}"
    "<|Assistant|>:{%if not (loop.last and not add_generation_prompt and "
    "message['content'][0]['type']=='text' and message['content'][0]['text']=='')%} {%endif%}"
    "{%else%}"
    "{{message['role'].capitalize()}}: "
    "{%endif%}"
    "{%for content in message['content']%}"
    "{%if content['type']=='image'%}"
    "{%if not loop.first%}{{'\n'}}{%endif%}"
    "<image_placeholder>"
    "{%if not loop.last%}{{'\n'}}{%endif%}"
    "{%elif content['type']=='text'%}"
    "{%set text=content['text']%}"
    "{%if loop.first%}{%set text=text.lstrip()%}{%endif%}"
    "{%if loop.last%}{%set text=text.rstrip()%}{%endif%}"
    "{%if not loop.first and message['content'][loop.index0-1]['type']=='text'%}"
    "{{' '+text}}"
    "{%else%}"
    "{{text}}"
    "{%endif%}"
    "{%endif%}"
    "{%endfor%}"
    "{%if not loop.last or add_generation_prompt%}"
    "{%if message['role']|lower=='user'%}"
    "{{seps[0]}}"
    "{%else%}"
    "{{seps[1]}}"
    "{%endif%}"
    "{%endif%}"
    "{%endfor%}"
    "{%if add_generation_prompt%}<|Assistant|>:{%endif%}"
)

_CORPUS = (
    "You are a helpful language and vision assistant.",
    "You are able to understand the visual content that the user provides,",
    "and assist the user with a variety of tasks using natural language.",
    "What is this? Describe the image in detail.",
    "What is in this picture? How many people are there?",
    "A photo of a cat sitting on a red chair next to a window.",
    "A painting of a lighthouse on a rocky coast at sunset.",
    "A small dog runs across the green grass in the park.",
    "The quick brown fox jumps over the lazy dog.",
    "Two children are playing with a ball on the beach.",
    "A bowl of fresh fruit: apples, oranges, bananas and grapes.",
    "The city skyline at night, with bright lights and tall buildings.",
    "An astronaut riding a horse on the moon, digital art.",
    "A cozy cabin in the snowy mountains, warm light in the windows.",
    "This image shows a street with cars, bicycles and people walking.",
    "There is a table with a laptop, a cup of coffee and a notebook.",
    "The sky is blue and the sun is shining over the quiet lake.",
    "A close-up portrait of an old man with a white beard.",
    "Please write a short poem about the sea and the wind.",
    "Sure! Here is a short answer to your question.",
    "I can see a bird flying above the trees in the forest.",
    "The text in the image says: Welcome to our little shop.",
    "Generate an image of a futuristic city with flying cars.",
    "A watercolor drawing of flowers in a glass vase, soft colors.",
    "The chart shows that sales grew from 2019 to 2024 by 42 percent.",
    "Hello, how are you today? I am fine, thank you very much.",
    "It looks like a plate of pasta with tomato sauce and basil.",
    "Answer the question based on the picture above, please.",
    "The train is arriving at the station; passengers are waiting.",
    "Numbers and symbols: 0 1 2 3 4 5 6 7 8 9 + - * / = ( ) [ ] { } # @ ! ? % & ' \" : ;",
)


def _corpus_iterator(repeats: int = 4) -> Iterator[str]:
    for _ in range(repeats):
        yield from _CORPUS


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE offline and wrap it like the real Janus-Pro tokenizer.

    Byte-level, so any text encodes; BOS prepended by a ``TemplateProcessing`` post-processor;
    the special tokens of the real checkpoint added after the learned vocabulary (as in the real
    one, where they sit at ids >= 100000); ``image_token``/``boi_token``/``eoi_token`` set through
    ``extra_special_tokens`` as ``JanusProcessor`` requires.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    backend.train_from_iterator(_corpus_iterator(), trainer=trainer)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    bos_id = backend.token_to_id(BOS_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0",
        pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN, "boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN},
        model_max_length=16384,
    )


@dataclass(frozen=True)
class JanusShape:
    """The sizes of a Janus-Pro model: the tiny test model, a mid-size one, or the real 1B / 7B
    architectures."""

    text_hidden: int = TEXT_HIDDEN_SIZE
    text_intermediate: int = 2 * TEXT_HIDDEN_SIZE
    text_layers: int = 2
    text_heads: int = 4
    text_vocab: int | None = None  # None: the tokenizer's size; real checkpoints have 102400 rows
    vision_hidden: int = 32
    vision_layers: int = 1
    vision_heads: int = 2
    image_size: int = IMAGE_SIZE  # vision input side; image tokens = (image_size // 16) ** 2
    vq_base_channels: int = VQ_BASE_CHANNELS
    vq_channel_multiplier: tuple[int, ...] = VQ_CHANNEL_MULTIPLIER
    vq_num_embeddings: int = VQ_NUM_EMBEDDINGS
    vq_latent_channels: int = 32
    vq_res_blocks: int = 1

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // PATCH_SIZE) ** 2


TINY = JanusShape()
# A CPU-benchmark size: a 25 M-parameter language model, the real image codebook, 8 x 8 image tokens.
MID = JanusShape(
    text_hidden=512,
    text_intermediate=1376,
    text_layers=8,
    text_heads=8,
    vision_hidden=64,
    vision_layers=2,
    vision_heads=4,
    image_size=128,
    vq_base_channels=64,
    vq_channel_multiplier=(1, 1, 2, 2, 4),
    vq_num_embeddings=16384,
    vq_latent_channels=64,
)
# deepseek-ai/Janus-Pro-1B and -7B (SigLIP-L vision at 384 px, 576 image tokens, 16384 image codes).
_REAL = JanusShape(
    text_vocab=102400,
    vision_hidden=1024,
    vision_layers=24,
    vision_heads=16,
    image_size=384,
    vq_base_channels=128,
    vq_channel_multiplier=(1, 1, 2, 2, 4),
    vq_num_embeddings=16384,
    vq_latent_channels=256,
    vq_res_blocks=2,
)
JANUS_PRO_1B = replace(_REAL, text_hidden=2048, text_intermediate=5632, text_layers=24, text_heads=16)
JANUS_PRO_7B = replace(_REAL, text_hidden=4096, text_intermediate=11008, text_layers=30, text_heads=32)


def build_tiny_janus(directory: Path, seed: int = SEED) -> Path:
    """Save a tiny random Janus-Pro checkpoint and its processor into ``directory``; return it.

    The result loads offline with ``AutoProcessor.from_pretrained(directory)`` and
    ``JanusForConditionalGeneration.from_pretrained(directory)``, answers questions about images
    (``generation_mode="text"``) and generates 64 x 64 images (``generation_mode="image"``, 16 tokens
    per image) through HF ``generate``. Deterministic for a given ``seed``; about 5 MB.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model, processor = build_random_janus(TINY, seed)
    processor.save_pretrained(directory)
    model.save_pretrained(directory)
    return directory


def build_random_janus(
    shape: JanusShape, seed: int = SEED, *, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[JanusForConditionalGeneration, JanusProcessor]:
    """A random Janus-Pro model of the given shape and its processor, in memory (speed does not depend on
    the weights' values, so this stands in for the real checkpoints in benchmarks)."""
    from transformers import (
        JanusConfig,
        JanusForConditionalGeneration,
        JanusImageProcessor,
        JanusProcessor,
        JanusVisionConfig,
        JanusVQVAEConfig,
        LlamaConfig,
    )

    tokenizer = build_tiny_tokenizer()
    # The tokenizer has all these tokens, so each id is a single int.
    bos = cast(int, tokenizer.bos_token_id)
    eos = cast(int, tokenizer.eos_token_id)
    pad = cast(int, tokenizer.pad_token_id)
    image_token_id = cast(int, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    boi = cast(int, tokenizer.convert_tokens_to_ids(BOI_TOKEN))

    image_processor = JanusImageProcessor(
        size={"height": shape.image_size, "width": shape.image_size},  # longest side, then padded to a square
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = JanusProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=JANUS_CHAT_TEMPLATE,
        use_default_system_prompt=True,
        num_image_tokens=shape.num_image_tokens,
    )

    hidden = shape.text_hidden
    text_config = LlamaConfig(
        vocab_size=shape.text_vocab or len(tokenizer),
        hidden_size=hidden,
        intermediate_size=shape.text_intermediate,
        num_hidden_layers=shape.text_layers,
        num_attention_heads=shape.text_heads,
        num_key_value_heads=shape.text_heads,
        hidden_act="silu",
        max_position_embeddings=4096,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    vision_config = JanusVisionConfig(
        hidden_size=shape.vision_hidden,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads,
        image_size=shape.image_size,
        patch_size=PATCH_SIZE,
        projection_dim=hidden,  # aligner output feeds the language model
        depth=2,
        num_image_tokens=shape.num_image_tokens,  # must be (image_size // patch_size) ** 2
    )
    vq_config = JanusVQVAEConfig(
        embed_dim=8,
        num_embeddings=shape.vq_num_embeddings,
        latent_channels=shape.vq_latent_channels,
        base_channels=shape.vq_base_channels,
        channel_multiplier=list(shape.vq_channel_multiplier),
        num_res_blocks=shape.vq_res_blocks,
        projection_dim=hidden,
        num_hidden_layers=2,
        image_token_embed_dim=hidden,
    )
    config = JanusConfig(
        text_config=text_config,
        vision_config=vision_config,
        vq_config=vq_config,
        image_token_id=image_token_id,
    )

    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = JanusForConditionalGeneration(config)
        # In place (returns the model itself). transformers declares `to` as `@wraps(nn.Module.to)`,
        # which pyright reads as the unbound function, so it takes `dtype` for `self`.
        model.to(dtype)  # pyright: ignore[reportArgumentType]
    model.eval()

    gc = model.generation_config
    gc._from_model_config = False  # otherwise generation_kwargs is dropped when loaded back
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = bos, eos, pad
    # generate(generation_mode="image") reads it from here. GenerationConfig keeps unknown kwargs as
    # attributes, so this one is not declared on the class.
    gc.generation_kwargs = {"boi_token_id": boi}  # pyright: ignore[reportAttributeAccessIssue]
    gc.guidance_scale = 5.0
    gc.temperature = 1.0
    return model, processor


# --------------------------------------------------------------------------------------------------
# Real-ESRGAN (basicsr RRDBNet layout, as in xinntao's RealESRGAN_x2plus.pth / x4plus.pth)

ESRGAN_NUM_FEAT = 16
ESRGAN_NUM_BLOCK = 1
ESRGAN_NUM_GROW_CH = 32  # spandrel's RRDBNet hard-codes 32


class _ResidualDenseBlock(nn.Module):
    def __init__(self, num_feat: int, num_grow_ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4, self.conv5):
            nn.init.kaiming_normal_(conv.weight)
            with torch.no_grad():
                conv.weight.mul_(0.1)  # basicsr default_init_weights(scale=0.1)
            assert conv.bias is not None
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = F.leaky_relu(self.conv1(x), 0.2)
        x2 = F.leaky_relu(self.conv2(torch.cat((x, x1), 1)), 0.2)
        x3 = F.leaky_relu(self.conv3(torch.cat((x, x1, x2), 1)), 0.2)
        x4 = F.leaky_relu(self.conv4(torch.cat((x, x1, x2, x3), 1)), 0.2)
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x


class _RRDB(nn.Module):
    def __init__(self, num_feat: int, num_grow_ch: int) -> None:
        super().__init__()
        self.rdb1 = _ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = _ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = _ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class TinyRRDBNet(nn.Module):
    """basicsr's ``RRDBNet`` (Real-ESRGAN generator): same module names, so the same state-dict keys.

    Scale 2 pixel-unshuffles the input first (``conv_first`` takes 3 * 4 channels), scale 4 does not.
    ``forward`` follows basicsr and serves as a reference for what spandrel computes from the file.
    """

    def __init__(
        self,
        scale: int = 2,
        num_feat: int = ESRGAN_NUM_FEAT,
        num_block: int = ESRGAN_NUM_BLOCK,
        num_grow_ch: int = ESRGAN_NUM_GROW_CH,
    ) -> None:
        super().__init__()
        if scale not in (2, 4):
            raise ValueError(f"scale must be 2 or 4, not {scale}")
        self.scale = scale
        in_ch = 3 * 4 if scale == 2 else 3
        self.conv_first = nn.Conv2d(in_ch, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(_RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, 3, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = F.pixel_unshuffle(x, 2) if self.scale == 2 else x
        feat = self.conv_first(feat)
        feat = feat + self.conv_body(self.body(feat))
        feat = F.leaky_relu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        feat = F.leaky_relu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))


def _add_identity_path(net: TinyRRDBNet, noise: float = 0.1) -> None:
    """Turn the random weights into "upscale the input, plus a little noise".

    Purely random weights give an almost black output, which hides bugs such as swapped channels or
    a wrong value range. Here channels 0-2 carry the RGB input through every convolution outside the
    RRDB body (scale 2: the mean of each 2 x 2 block after pixel-unshuffle), the random weights are
    scaled down to ``noise`` and the body is kept random. So the output resembles a nearest-neighbour
    upscale of the input (x4 exactly so, x2 from 2 x 2 block means) with small random deviations.
    spandrel only looks at the shapes, so detection is unaffected.
    """
    with torch.no_grad():
        outer = (net.conv_first, net.conv_body, net.conv_up1, net.conv_up2, net.conv_hr, net.conv_last)
        for conv in outer:
            conv.weight.mul_(noise)
            assert conv.bias is not None
            conv.bias.zero_()
        for c in range(3):
            if net.scale == 2:  # pixel_unshuffle puts colour c's 2 x 2 sub-pixels at channels 4c .. 4c+3
                net.conv_first.weight[c, 4 * c : 4 * c + 4, 1, 1] += 0.25
            else:
                net.conv_first.weight[c, c, 1, 1] += 1.0
            net.conv_last.weight[c, c, 1, 1] += 1.0
        for conv in (net.conv_up1, net.conv_up2, net.conv_hr):
            for c in range(conv.weight.shape[0]):
                conv.weight[c, c, 1, 1] += 1.0


def build_tiny_esrgan(path: Path, scale: int = 2, seed: int = SEED) -> Path:
    """Write a tiny Real-ESRGAN ``.pth`` (``{"params_ema": state_dict}``, basicsr keys) to ``path``.

    16 features, 1 RRDB block, growth channels 32; ``scale`` 2 or 4. spandrel loads it as an
    ``ImageModelDescriptor`` with ``architecture.id == "ESRGAN"`` and ``scale == scale``. Random
    weights around an identity path, so the output looks like a roughly upscaled input rather than
    noise (see ``_add_identity_path``). Deterministic for a given ``seed``; about 1.2 MB.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + scale)
        net = TinyRRDBNet(scale=scale)
    _add_identity_path(net)
    state_dict = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    torch.save({"params_ema": state_dict}, path)
    return path


def build_not_an_upscaler(path: Path, seed: int = SEED) -> Path:
    """Write a ``.pth`` that loads fine with ``torch.load`` but is no model spandrel knows.

    For testing the "this file is not a supported upscaler" error path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    state_dict = {
        "encoder.layer0.weight": torch.randn(8, 4, generator=generator),
        "encoder.layer0.bias": torch.zeros(8),
        "classifier.weight": torch.randn(2, 8, generator=generator),
    }
    torch.save({"params_ema": state_dict}, path)
    return path

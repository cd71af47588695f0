"""From user input to model input: images resized for the encoder, chat messages templated, and each image
placeholder expanded to exactly the number of visual tokens the model will produce for that image.

Notation: H x W pixels after resizing; L prompt tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fovea.config import PreprocessConfig
from fovea.preprocess.image import load_image


@dataclass
class PreparedImage:
    pixels: torch.Tensor  # (3, H, W) normalised, H and W multiples of the encoder stride
    original_size: tuple[int, int]  # (height, width) of the decoded image
    content_size: tuple[int, int]  # (height, width) of the resized image before padding


class ImageProcessor:
    """Loads an image under the pixel limit and brings it to the encoder's input size (aspect ratio kept)."""

    def __init__(self, *, encoder: Any, cfg: PreprocessConfig) -> None:
        self.encoder, self.cfg = encoder, cfg

    def __call__(self, image: Any) -> PreparedImage:
        if isinstance(image, PreparedImage):  # prepared once for several prompts (questions about one page)
            return image
        img = load_image(image, max_pixels=self.cfg.max_pixels)
        original = (img.height, img.width)
        if self.cfg.center_crop:
            img = self._center_crop(img)
            content = size = (img.height, img.width)
        elif self.cfg.square:
            # The whole image fits inside one max_side square canvas: fixed-size encoders see their native size.
            side = self._square_side()
            scale = side / max(img.height, img.width)
            content = (min(side, max(1, round(img.height * scale))), min(side, max(1, round(img.width * scale))))
            size = (side, side)
        else:
            args = (img.height, img.width, self.cfg.max_side, self.cfg.upscale)
            content = self.encoder.resized_content(*args)
            size = self.encoder.input_size(*args)
        pixels = self.encoder.compose(img, content, size, self.cfg)  # the encoder's own input layout
        return PreparedImage(pixels=pixels, original_size=original, content_size=content)

    def _square_side(self) -> int:
        """Side of the square input (``square`` and ``center_crop``): max_side rounded up to the encoder stride."""
        return self.encoder.input_size(self.cfg.max_side, self.cfg.max_side, self.cfg.max_side, True)[0]

    def _center_crop(self, img):
        """Shorter side resized to the square side, long side scaled and truncated as transformers does, then the
        centre square cut out (the image edges beyond it are lost: a choice of the checkpoint's processor)."""
        from PIL import Image

        side = self._square_side()
        short, long = min(img.height, img.width), max(img.height, img.width)
        new_long = int(side * long / short)
        height, width = (side, new_long) if img.height <= img.width else (new_long, side)
        if (img.height, img.width) != (height, width):
            img = img.resize((width, height), Image.Resampling.BICUBIC)
        top, left = (height - side) // 2, (width - side) // 2
        return img.crop((left, top, left + side, top + side))


@dataclass
class Prompt:
    input_ids: torch.Tensor  # (L,) with each image's placeholder expanded to its visual-token count
    images: list[PreparedImage]  # in the order their placeholders appear
    num_visual_tokens: list[int]  # visual tokens per image, from the model's own counting function
    instructions: list[torch.Tensor]  # per image, token ids of the text of the message it came in (Q-Former input)
    messages: list[dict]  # the messages as templated: content flattened to text with image placeholders


def message_text(content: str | Sequence[dict], image_token: str) -> tuple[str, int]:
    """Flatten OpenAI-style content parts to text with ``image_token`` where each image goes; returns the text and
    the number of image parts."""
    if isinstance(content, str):
        return content, content.count(image_token)
    pieces, count = [], 0
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            pieces.append(str(part.get("text", "")))
        elif kind in ("image", "image_url"):
            pieces.append(image_token)
            count += 1
        else:
            raise ValueError(f"unsupported message part {part!r}; expected type 'text', 'image' or 'image_url'")
    return "".join(pieces), count


class Processor:
    """Chat template + placeholder expansion. ``num_visual_tokens(H, W)`` is the model's own function, so the
    prompt always carries exactly as many placeholders as the connector emits."""

    def __init__(
        self, *, tokenizer: Any, image_processor: ImageProcessor, num_visual_tokens: Callable[..., int],
        image_token: str, instruction_tokenizer: Any = None,
    ) -> None:
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.instruction_tokenizer = instruction_tokenizer or tokenizer  # the Q-Former's own, when it has one
        self.num_visual_tokens, self.image_token = num_visual_tokens, image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)

    def __call__(self, messages: Sequence[dict], images: Sequence[Any] = (), *, add_generation_prompt: bool = True):
        if not messages:
            raise ValueError("messages is empty; give at least one message")
        prepared = [self.image_processor(image) for image in images]
        templated, instructions = [], []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {message!r}")
            text, count = message_text(message["content"], self.image_token)
            templated.append({"role": message["role"], "content": text})
            plain = text.replace(self.image_token, " ").strip()
            instructions.extend([self._ids(plain, self.instruction_tokenizer)] * count)
        if len(instructions) != len(prepared):
            raise ValueError(f"messages hold {len(instructions)} image placeholders but {len(prepared)} images given")
        text = self.tokenizer.apply_chat_template(
            templated, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        ids = self._ids(text)
        counts = [self.num_visual_tokens(*p.pixels.shape[-2:], p.original_size) for p in prepared]
        return Prompt(input_ids=self.expand(ids, counts), images=prepared, num_visual_tokens=counts,
                      instructions=instructions, messages=templated)

    def _ids(self, text: str, tokenizer: Any = None) -> torch.Tensor:
        tokenizer = tokenizer or self.tokenizer
        return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    def expand(self, ids: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Replace the i-th placeholder id in ``ids`` (L,) by ``counts[i]`` copies of it."""
        return ids.repeat_interleave(self.repeats(ids, counts))

    def repeats(self, ids: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """(L,) copies of each position of ``ids`` that ``expand`` makes: ``counts[i]`` at the i-th placeholder, 1
        elsewhere; what any tensor aligned with ``ids`` (labels, masks) is expanded by."""
        positions = (ids == self.image_token_id).nonzero().flatten().tolist()
        if len(positions) != len(counts):
            raise ValueError(f"prompt has {len(positions)} image placeholders but {len(counts)} images were given")
        repeats = torch.ones_like(ids)
        repeats[positions] = torch.tensor(counts, dtype=torch.long) if counts else repeats[positions]
        return repeats

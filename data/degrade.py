"""Image corruptions for the `degrade` feature enhancer: what a flow learns to undo in z.

Each works on one image [3,H,W] in [0,1] at the model's resolution, with its strength drawn from
a torch.Generator, so a (seed, image) pair always gives the same corrupted copy. Strengths are
relative to the image size, so a 32 px toy image and a 384 px photo lose alike.
"""
import io

import torch
from PIL import Image
from torchvision.transforms.functional import gaussian_blur, pil_to_tensor, resize, to_pil_image

from errors import BadInput


def _uniform(generator, low, high):
    return low + (high - low) * torch.rand((), generator=generator).item()


def gaussian_noise(image, generator):
    sigma = _uniform(generator, 0.08, 0.16)
    noise = torch.randn(image.shape, generator=generator)
    return (image + sigma * noise).clamp(0, 1)


def blur(image, generator):
    sigma = _uniform(generator, 0.03, 0.05) * image.shape[-1]  # about 1-1.6 px at 32 px
    kernel = 2 * int(3 * sigma) + 1
    return gaussian_blur(image, [kernel, kernel], [sigma, sigma])


def jpeg(image, generator):
    quality = int(_uniform(generator, 8, 20))
    buffer = io.BytesIO()
    to_pil_image((image * 255).round().to(torch.uint8)).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return pil_to_tensor(Image.open(buffer).convert("RGB")).float() / 255


def downscale(image, generator):
    """Down to a third or a quarter of the side and back up (bilinear)."""
    size = image.shape[-2:]
    factor = _uniform(generator, 3.0, 4.0)
    small = [max(1, round(s / factor)) for s in size]
    return resize(resize(image, small, antialias=True), list(size), antialias=False).clamp(0, 1)


DEGRADATIONS = {"noise": gaussian_noise, "blur": blur, "jpeg": jpeg, "downscale": downscale}


def parse_degradations(text):
    """'noise,blur' -> ['noise', 'blur']; one line for an unknown name."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in DEGRADATIONS]
    if unknown or not names:
        raise BadInput(f"--degradations {text!r}: {'unknown ' + ', '.join(unknown) if unknown else 'empty'}; "
                       f"choose from {', '.join(DEGRADATIONS)}")
    return names


def degrade(image, kind, seed):
    """One corrupted copy of image [3,H,W] in [0,1]: `kind` a name of DEGRADATIONS, strength drawn
    from `seed`."""
    return DEGRADATIONS[kind](image.float().cpu(), torch.Generator().manual_seed(seed)).to(image.dtype)


def random_degrade(image, kinds, seed):
    """A corruption drawn from `kinds` with `seed`, then applied with it -> (image, kind)."""
    generator = torch.Generator().manual_seed(seed)
    kind = kinds[int(torch.randint(len(kinds), (), generator=generator))]
    return DEGRADATIONS[kind](image.float().cpu(), generator).to(image.dtype), kind

"""Starting weights for training a SAM from scratch (:func:`init_from_scratch`)."""

from __future__ import annotations

import torch

from ..modeling import Sam


# Gain on the query projection of the mask decoder's cross-attention layers when
# init_from_scratch ties their key projections to it (tie_cross_attention=True).
TIED_CROSS_ATTENTION_GAIN = 2.0


def init_from_scratch(
    model: Sam, seed: int = 0, tie_cross_attention: bool = False, positional_encoding_scale: float = 1.0,
) -> Sam:
    """Initialise every weight of ``model`` from ``seed`` for training from scratch (in place).

    Every layer gets PyTorch's default initialisation (``reset_parameters``), drawn after
    ``torch.manual_seed(seed)``, so the starting weights depend only on the seed; the
    absolute position embedding gets a truncated normal (std 0.02, as in ViT and MAE) so
    that the image embedding carries position from the start; the prompt encoder's random
    Fourier matrix is redrawn (standard normal, SAM's scale 1); relative-position tables
    start at zero, as in SAM.

    ``positional_encoding_scale`` multiplies that Fourier matrix (SAM's ``scale``; 1 by
    default). Larger values encode positions with higher spatial frequencies: the dot
    product of two encodings falls off with their distance like a Gaussian of standard
    deviation ``1 / (4 pi scale)`` of the input side, about 20 px for ``vit_small`` at 1
    and 7 px at 3.

    With ``tie_cross_attention`` (not in SAM), each cross-attention layer of the mask
    decoder (token to image, image to token) starts with its key projection equal to its
    query projection, scaled by ``TIED_CROSS_ATTENTION_GAIN``. The attention logits then
    start as a positive semi-definite form of the inputs, and the prompt tokens and the
    image positions carry the same random Fourier encoding, so an image position attends
    most to the prompt points near it from the first step, so that the mask decoder leaves
    its early all-background plateau sooner.

    Args:
        model: the SAM to initialise (any registry type).
        seed: seed of every drawn weight.
        tie_cross_attention: tie the mask decoder's cross-attention keys to its queries.
        positional_encoding_scale: standard deviation of the prompt encoder's Fourier matrix.

    Returns:
        ``model``, initialised.
    """
    torch.manual_seed(seed)
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    encoder = model.image_encoder
    if encoder.pos_embed is not None:
        torch.nn.init.trunc_normal_(encoder.pos_embed, std=0.02)
    for block in encoder.blocks:
        if getattr(getattr(block, "attn", None), "use_rel_pos", False):
            torch.nn.init.zeros_(block.attn.rel_pos_h)
            torch.nn.init.zeros_(block.attn.rel_pos_w)
    matrix = model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
    matrix.copy_(torch.randn(matrix.shape) * positional_encoding_scale)
    if tie_cross_attention:
        transformer = model.mask_decoder.transformer
        cross = [transformer.final_attn_token_to_image]
        for block in transformer.layers:
            cross += [block.cross_attn_token_to_image, block.cross_attn_image_to_token]
        with torch.no_grad():
            for attention in cross:
                attention.q_proj.weight.mul_(TIED_CROSS_ATTENTION_GAIN)
                attention.k_proj.weight.copy_(attention.q_proj.weight)
                attention.k_proj.bias.copy_(attention.q_proj.bias)
    return model

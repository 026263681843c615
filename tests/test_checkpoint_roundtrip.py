"""Official-architecture state dicts load both ways with strict key matching."""

from __future__ import annotations

import pytest
import torch

from napari_sam import sam_model_registry

segment_anything = pytest.importorskip("segment_anything")


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h"])
def test_round_trip_with_reference(model_type, tmp_path):
    torch.manual_seed(0)
    reference = segment_anything.sam_model_registry[model_type]()
    with torch.no_grad():
        for tensor in reference.state_dict().values():  # make every tensor distinctive
            tensor.add_(torch.rand_like(tensor.float()).to(tensor.dtype))
    ref_path = tmp_path / "reference.pth"
    torch.save(reference.state_dict(), ref_path)

    ours = sam_model_registry[model_type](checkpoint=ref_path)  # reference -> ours, strict
    ours_state = ours.state_dict()
    ref_state = reference.state_dict()
    assert list(ours_state) == list(ref_state)
    for name in ref_state:
        assert torch.equal(ours_state[name], ref_state[name]), name
    del reference, ref_state

    our_path = tmp_path / "ours.pth"
    torch.save(ours_state, our_path)
    back = segment_anything.sam_model_registry[model_type](checkpoint=str(our_path))  # ours -> reference
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, ours_state[name]), name

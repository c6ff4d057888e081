"""Sharded HF load in one process: it equals load_hf, and a shape mismatch is named."""

import pytest
import torch

from tests.helpers import sharded_load_args


def test_shape_mismatch_is_rejected(hf_dir):
    from moonlight.errors import CheckpointError
    from moonlight.model import Moonlight
    from moonlight.parallel.load import load_hf_sharded

    args = sharded_load_args()
    import dataclasses

    model = Moonlight(dataclasses.replace(args, vocab_size=args.vocab_size + 2))
    with pytest.raises(CheckpointError, match="vocab_size"):
        load_hf_sharded(model, hf_dir)


def test_single_process_load_matches_load_hf(hf_dir):
    from moonlight.hf import load_hf
    from moonlight.model import Moonlight
    from moonlight.parallel.load import load_hf_sharded

    ref = load_hf(hf_dir, kernels="torch")
    with torch.device("meta"):
        model = Moonlight(sharded_load_args())
    model.to_empty(device="cpu")
    load_hf_sharded(model, hf_dir)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, atol=0, rtol=0)

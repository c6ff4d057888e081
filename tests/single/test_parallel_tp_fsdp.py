"""TP / FSDP pieces in one process: activation checkpointing alone gives the same loss, gradients and
load counters; the plain cross-entropy matches torch's; and TP x FSDP quiets exactly its two notices."""

import copy

import torch

from tests.helpers import parallel_tp_fsdp_reference, reference_step


def test_activation_checkpointing_single_process():
    """AC alone (no process group): identical loss, gradients and load counters."""
    from moonlight.parallel.data_parallel import apply_activation_checkpointing

    ref, inputs, labels = parallel_tp_fsdp_reference()
    ref_loss, ref_grads, ref_counts = reference_step(copy.deepcopy(ref), inputs, labels)
    for mode in ("full", "selective", "op"):
        model = apply_activation_checkpointing(copy.deepcopy(ref), mode)
        loss, grads, counts = reference_step(model, inputs, labels)
        assert set(dict(model.named_parameters())) == set(ref_grads)  # names unchanged
        torch.testing.assert_close(loss, ref_loss, atol=0, rtol=0)
        for n in ref_grads:
            torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-6, rtol=1e-5)
        for n in ref_counts:
            torch.testing.assert_close(counts[n], ref_counts[n], atol=0, rtol=0)


def test_cross_entropy_plain_matches_torch():
    from moonlight.parallel.tensor import cross_entropy_loss

    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, 1] = -100
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
    torch.testing.assert_close(cross_entropy_loss(logits, labels), ref)


def test_the_two_tp_fsdp_notices_are_quiet_and_nothing_else():
    """TP x FSDP silences FSDP's view-tensor warning and DTensor's two-dim norm notice (their results
    are checked against the single process above and in tests/multirank/test_train_parallelisms.py), nothing more."""
    import logging
    import warnings

    from moonlight.parallel.parallelize import quiet_tp_fsdp_warnings

    logger = logging.getLogger("torch.distributed.tensor._redistribute")
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_tp_fsdp_warnings()
            warnings.warn("FSDP2-wrapped module (Embedding) returned a view tensor. An in-place op ...", stacklevel=1)
            warnings.warn("FSDP2 something else", stacklevel=1)
            logger.warning(
                "While redistributing from %s to %s, %d sequential %s operations ...",
                "(_NormPartial(norm_type=2.0), _NormPartial(norm_type=2.0))",
                "(Replicate(),)",
                2,
                "all_reduce",
            )
            logger.warning("While redistributing from %s to %s, ...", "(Partial(sum),)", "(Replicate(),)")
    finally:
        logger.removeHandler(handler)
    assert [str(w.message) for w in caught] == ["FSDP2 something else"]
    assert [r.getMessage() for r in seen] == ["While redistributing from (Partial(sum),) to (Replicate(),), ..."]

"""Text-to-video pre-training (launch with torchrun; see examples/*/t2v/pretrain_t2v.sh)."""

from mm.accelerator.notices import quiet_known_notices

quiet_known_notices()  # before megatron-core and torch are imported (MM_VERBOSE=1 or --verbose: rank 0 shows them)

from mm.training.pretrain import pretrain  # noqa: E402

if __name__ == "__main__":
    pretrain()

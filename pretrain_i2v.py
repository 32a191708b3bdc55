"""Image-to-video pre-training (Wan2.1 I2V/FLF2V, Wan2.2 I2V-A14B and TI2V-5B; launch with torchrun;
see examples/*/i2v*/pretrain_i2v.sh)."""

from mm.accelerator.notices import quiet_known_notices

quiet_known_notices()  # before megatron-core and torch are imported (MM_VERBOSE=1 or --verbose: rank 0 shows them)

from mm.training.pretrain import pretrain  # noqa: E402

if __name__ == "__main__":
    pretrain(task="i2v")

"""Video VAE training (launch with torchrun or python; see examples/quickstart/run.sh)."""

from mm.accelerator.notices import quiet_known_notices

quiet_known_notices()  # before megatron-core and torch are imported (MM_VERBOSE=1 or --verbose: rank 0 shows them)

from mm.training.pretrain_vae import pretrain_vae  # noqa: E402

if __name__ == "__main__":
    pretrain_vae()
